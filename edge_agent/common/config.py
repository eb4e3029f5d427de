"""Configuration files: the agent's and the bridge's, validated with pydantic.

Unknown keys are errors everywhere (``extra="forbid"``). Secrets never live in
the file: a ``*_env`` key names the environment variable that holds them.
Problems are reported one line each, ``path: message``, the path naming list
items by their ``id`` where they have one (``cameras[cam-1].fps``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError


class ConfigError(Exception):
    """A config file that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# What every entry point exits with when it refuses its config file (systemd shows the lines above it).
EXIT_BAD_CONFIG = 2


def print_problems(problems: Iterable[str]) -> int:
    """A refused config's problems on stderr, one line each, as every entry point reports them;
    returns EXIT_BAD_CONFIG for the caller to exit with."""
    for line in problems:
        print(line, file=sys.stderr)
    return EXIT_BAD_CONFIG


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice ``word`` was most likely meant to be (a typo's fix), or None."""
    found = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    swapped = [c for c in found if sorted(c) == sorted(word)]  # two letters swapped: rtps -> rtsp, not rtsps
    return (swapped or found or [None])[0]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean fps?"`` when a choice is close to ``word``, else ``""``."""
    match = closest(word, choices)
    return f"; did you mean {match}?" if match else ""


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """``1GiB``, ``500MB``, ``1048576`` -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 1GiB, 500MB or a number of bytes)")
    number, scale = m.group(1), _SIZE_UNITS[m.group(2).lower()]
    # Whole numbers in integer arithmetic: a float loses bytes above 2**53 (found by hypothesis).
    return int(number) * scale if number.isdigit() else int(float(number) * scale)


def env_secret(var: str | None) -> str | None:
    """The secret held by the environment variable ``var`` (None when no variable is named)."""
    if not var:
        return None
    return os.environ.get(var)


def file_problem(path: Path) -> str | None:
    """Why ``path`` is not a file this process can read (``"<path>: no such file"``), or None.

    For check-config: the daemons open these files later (TLS at connect, the model when a camera
    starts), where a missing one fails over and over instead of once, here.
    """
    shown = f"{path} (from the working directory {Path.cwd()})" if not path.is_absolute() else str(path)
    try:
        if not path.exists():
            return f"{shown}: no such file"
        if not path.is_file():
            return f"{shown}: not a regular file"
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"{shown}: cannot read: {e.strerror or e}"
    except ValueError as e:  # a NUL byte in the path
        return f"{shown}: not a usable path: {e}"
    return None


# --- shared pieces ---------------------------------------------------------------------------

class TlsConfig(Strict):
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False  # skip hostname verification (lab use only)

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> "TlsConfig":
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be given together")
        return self

    def file_problems(self, where: str) -> list[str]:
        """``<where>.ca: /etc/x/ca.crt: no such file`` for each named file that cannot be read."""
        named = {"ca": self.ca, "cert": self.cert, "key": self.key}
        found = ((name, file_problem(path)) for name, path in named.items() if path is not None)
        return [f"{where}.{name}: {problem}" for name, problem in found if problem]


class MqttConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    tls: TlsConfig | None = None
    username: str | None = None
    password_env: str | None = None
    topic_prefix: str = Field("edge", pattern=r"^[^#+/][^#+]*$")
    client_id: str | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)


class LogConfig(Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"

    @field_validator("level", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value  # `info` as Python's logging takes it


class HttpConfig(Strict):
    listen: str = "127.0.0.1:9108"

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        host, sep, port = value.strip().rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise PydanticCustomError("listen", "expected HOST:PORT with a port from 1 to 65535, "
                                      f"e.g. 127.0.0.1:9108, not {value!r}")
        if not host.strip("[] "):
            # An empty host means every interface to some programs and nothing to others: say which.
            raise PydanticCustomError("listen", f"{value!r} has no host: write 127.0.0.1:{port} (this host only) "
                                      f"or 0.0.0.0:{port} (every interface)")
        return value.strip()

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


# --- field paths -----------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
Loc = Sequence[str | int]


def _loc_part(part: str | int) -> str:
    """One step of a field path; a key that is not plain is quoted so a problem stays one line."""
    if isinstance(part, int) or _PLAIN_KEY.fullmatch(part):
        return str(part)
    return json.dumps(part[:64] + ("…" if len(part) > 64 else ""))


def _id_of(item: Any) -> Any:
    return item.get("id") if isinstance(item, Mapping) else getattr(item, "id", None)


def _item_id(items: Any, index: int) -> str | None:
    """The id naming ``items[index]`` in a path: plain, and unique in its list (else the index is clearer)."""
    if not isinstance(items, Sequence) or isinstance(items, str) or not 0 <= index < len(items):
        return None
    ident = _id_of(items[index])
    if not isinstance(ident, str) or not _PLAIN_ID.fullmatch(ident):
        return None
    return ident if sum(1 for x in items if _id_of(x) == ident) == 1 else None


def _child(node: Any, part: str | int) -> Any:
    if isinstance(part, int):
        ok = isinstance(node, Sequence) and not isinstance(node, str) and 0 <= part < len(node)
        return node[part] if ok else None
    if isinstance(node, Mapping):
        return node.get(part)
    return getattr(node, part, None) if isinstance(node, BaseModel) else None


def field_path(loc: Loc, doc: Any = None, *, root: str = "(file)") -> str:
    """``("cameras", 0, "fps")`` -> ``cameras[cam-1].fps`` when ``doc`` (the document, or the config
    built from it) gives that camera an id, else ``cameras.0.fps``."""
    text, node = "", doc
    for part in loc:
        ident = _item_id(node, part) if isinstance(part, int) else None
        if ident is not None:
            text += f"[{ident}]"
        else:
            text += ("." if text else "") + _loc_part(part)
        node = _child(node, part)
    return text or root


def _unwrapped(tp: Any) -> Any:
    """The type under Annotated and Optional (a union of several types stays as it is)."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _type_at(tp: Any, loc: Loc) -> Any:
    """The declared type at ``loc`` inside model ``tp`` (None where the path leaves the models)."""
    for part in loc:
        tp = _unwrapped(tp)
        origin, args = get_origin(tp), get_args(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            field = tp.model_fields.get(part)
            tp = field.annotation if field else None
        elif origin in (list, tuple, set, frozenset) and args and isinstance(part, int):
            tp = args[part] if origin is tuple and args[-1] is not Ellipsis and part < len(args) else args[0]
        elif origin is dict and len(args) == 2:
            tp = args[1]
        else:
            return None
    return _unwrapped(tp)


def _unknown_key_message(model: type[BaseModel] | None, loc: Loc) -> str:
    """``unknown key``, with the closest field name of the model that holds the key."""
    holder = _type_at(model, loc[:-1]) if model is not None and loc else None
    if isinstance(holder, type) and issubclass(holder, BaseModel) and isinstance(loc[-1], str):
        return "unknown key" + did_you_mean(loc[-1], holder.model_fields)
    return "unknown key"


class HasErrors(Protocol):
    """pydantic's ValidationError, or an error that carries its errors() (FastAPI's request errors)."""

    def errors(self) -> Any: ...


def problem_lines(err: HasErrors, *, root: str = "(file)", doc: Any = None,
                  model: type[BaseModel] | None = None) -> list[str]:
    """One "path: message" line per problem; ``root`` names the whole document (a file, a body...).

    With ``doc`` (the input document) list items are named by id; with ``model`` (the model it was
    validated as) an unknown key gets the closest field name as a suggestion.
    """
    lines = []
    for e in err.errors():
        path = field_path(e["loc"], doc, root=root)
        msg = " ".join(e["msg"].split())
        if e["type"] == "extra_forbidden":
            msg = _unknown_key_message(model, e["loc"])
        lines.append(f"{path}: {msg}")
    return lines


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_config(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    """A config document validated as ``model``; ConfigError names every problem by its field path."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(problem_lines(e, doc=data, model=model)) from e


# --- reading YAML ----------------------------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _duplicate_keys(node: yaml.Node | None) -> list[tuple[tuple[str | int, ...], int, int]]:
    """(path of the key, line of its first use, line of the repeat) for every key given twice in
    one mapping: PyYAML would silently keep the last one."""
    found: list[tuple[tuple[str | int, ...], int, int]] = []
    seen_nodes: set[int] = set()  # aliases share nodes (and may loop): visit each node once
    stack: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(node, ())] if node is not None else []
    while stack:
        current, loc = stack.pop()
        if id(current) in seen_nodes:
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in current.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                    continue
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first:
                    found.append(((*loc, key.value), first[(key.tag, key.value)], line))
                first.setdefault((key.tag, key.value), line)
                stack.append((value, (*loc, key.value)))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, (*loc, i)) for i, item in enumerate(current.value))
    return sorted(found, key=lambda d: d[2])


def parse_yaml_mapping(raw: bytes | str) -> dict[str, Any]:
    """A config file's bytes -> its top-level mapping (empty file: {}); ConfigError says what is wrong.

    The one reader of config files (check-config, run, the live config): it refuses a key given twice
    in one mapping, which YAML forbids and PyYAML would take as "the last one wins".
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            duplicates = _duplicate_keys(node)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except UnicodeDecodeError as e:
        raise ConfigError([f"(file): not UTF-8: {e}"]) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"(file): not valid YAML: {e}".replace("\n", " ")]) from e
    except RecursionError as e:  # PyYAML composes nested collections recursively
        raise ConfigError(["(file): nested too deeply to be a config file"]) from e
    if duplicates:
        raise ConfigError([f"{field_path(loc, data)}: duplicate key, " + (f"on lines {a} and {b}" if a != b else
                                                                            f"twice on line {a}")
                           for loc, a, b in duplicates])
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(file): the top level must be a mapping"])
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError([f"(file): cannot read {path}: {e.strerror or e}"]) from e
    return parse_yaml_mapping(raw)


def missing_secrets(cfg: BaseModel, env: Mapping[str, str] | None = None) -> list[str]:
    """``*_env`` variables that are named but not set (in ``env``, default: this process's), as problem lines."""
    env = os.environ if env is None else env
    found: list[str] = []

    def walk(obj: Any, loc: tuple[str | int, ...]) -> None:
        if isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                value = getattr(obj, name)
                if name.endswith("_env") and isinstance(value, str) and value not in env:
                    found.append(f"{field_path((*loc, name), cfg)}: environment variable {value} is not set")
                walk(value, (*loc, name))
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                walk(item, (*loc, i))

    walk(cfg, ())
    return found
