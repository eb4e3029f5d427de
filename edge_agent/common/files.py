"""Writing small state files so that a crash leaves the old or the new content, never a mix."""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_swept: set[Path] = set()  # targets whose leftover temp files this process has removed
# One sweep at a time, and a first write waits for its sweep: it must not delete a live temp file.
_swept_lock = threading.RLock()


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def _is_temp_of(path: Path, name: str) -> bool:
    # Exactly ours: ".agent.yaml.<16 hex>.tmp" (or the 8 characters of the mkstemp names older
    # versions used), never a sibling's such as ".agent.yaml.bak.<16 hex>.tmp".
    return re.fullmatch(re.escape(f".{path.name}.") + r"(?:[0-9a-f]{16}|[a-z0-9_]{8})\.tmp", name) is not None


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files a crashed ``atomic_write`` of ``path`` left behind.

    Call it at start, before this process writes ``path`` (``atomic_write`` does so on its
    first write of a path): a write in progress in this process would lose its temp file.
    """
    path = Path(path).absolute()
    removed: list[Path] = []
    with _swept_lock:
        _swept.add(path)
        try:
            names = [n for n in os.listdir(path.parent) if _is_temp_of(path, n)]
        except OSError:
            return removed
        for name in names:
            try:
                (path.parent / name).unlink()
                removed.append(path.parent / name)
            except OSError as e:
                log.warning("cannot remove stale temp file %s: %s", path.parent / name, e.strerror or e)
    if removed:
        log.info("removed %d temp file(s) a crashed write of %s left behind", len(removed), path)
    return removed


def _sweep_once(path: Path) -> None:
    with _swept_lock:
        if path.absolute() not in _swept:
            remove_stale_temps(path)


def atomic_write(path: Path, raw: bytes, *, mode: int | None = None) -> None:
    """Temp file in the same directory, fsync, rename over, fsync the directory: all or nothing.

    The file keeps its mode (``mode`` when given, else the existing file's, else 0640).
    """
    path = Path(path)
    _sweep_once(path)
    if mode is None:
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o640
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
