"""Configuration files: the agent's and the bridge's, validated with pydantic.

Unknown keys are errors everywhere (``extra="forbid"``). Secrets never live in
the file: a ``*_env`` key names the environment variable that holds them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(Exception):
    """A config file that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


# --- agent -----------------------------------------------------------------------------------


class HttpConfig(Strict):
    listen: str = Field("127.0.0.1:9108", pattern=r"^.+:\d{1,5}$")

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


# --- bridge ----------------------------------------------------------------------------------


# --- loading ---------------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _loc_part(part: str | int) -> str:
    """One step of a field path; a key that is not plain is quoted so a problem stays one line."""
    if isinstance(part, int) or _PLAIN_KEY.fullmatch(part):
        return str(part)
    return json.dumps(part[:64] + ("…" if len(part) > 64 else ""))


class HasErrors(Protocol):
    """pydantic's ValidationError, or an error that carries its errors() (FastAPI's request errors)."""

    def errors(self) -> Any: ...


def problem_lines(err: HasErrors, *, root: str = "(file)") -> list[str]:
    """One "path: message" line per problem; ``root`` names the whole document (a file, a body...)."""
    lines = []
    for e in err.errors():
        path = ".".join(_loc_part(p) for p in e["loc"]) or root
        msg = " ".join(e["msg"].split())
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {msg}")
    return lines


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_config(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    """A config document validated as ``model``; ConfigError names every problem by its field path."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(problem_lines(e)) from e


def parse_yaml_mapping(raw: bytes | str) -> dict[str, Any]:
    """A config file's bytes -> its top-level mapping (empty file: {}); ConfigError says what is wrong."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError([f"(file): not UTF-8: {e}"]) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"(file): not valid YAML: {e}".replace("\n", " ")]) from e
    except RecursionError as e:  # PyYAML composes nested collections recursively
        raise ConfigError(["(file): nested too deeply to be a config file"]) from e
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


def missing_secrets(cfg: BaseModel) -> list[str]:
    """``*_env`` variables that are named but not set, as problem lines."""
    found: list[str] = []

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                value = getattr(obj, name)
                here = f"{path}.{name}" if path else name
                if name.endswith("_env") and isinstance(value, str) and value not in os.environ:
                    found.append(f"{here}: environment variable {value} is not set")
                walk(value, here)
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                walk(item, f"{path}.{i}")

    walk(cfg, "")
    return found



