"""Configuration files: the agent's and the bridge's, validated with pydantic.

Unknown keys are errors everywhere (``extra="forbid"``). Secrets never live in
the file: a ``*_env`` key names the environment variable that holds them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .envelope import MAX_MESSAGE_BYTES

STREAMS: tuple[str, ...] = ("camera.events", "ai.inference.results", "notifications", "audit.logs")
# Lowest priority first: an overflowing outbox drops from the front of this list.
STREAM_PRIORITY: tuple[str, ...] = ("ai.inference.results", "camera.events", "notifications", "audit.logs")


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


Point = tuple[Annotated[float, Field(ge=0.0, le=1.0)], Annotated[float, Field(ge=0.0, le=1.0)]]


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

class AgentMqttConfig(MqttConfig):
    max_inflight: int = Field(1000, ge=1, le=65535)  # published, not yet acked end to end
    ack_timeout_s: float = Field(10.0, gt=0)  # resend what stays unacked this long
    ack_timeout_max_s: float = Field(300.0, gt=0)  # cap of the resend backoff
    drain_rate: float = Field(4000.0, ge=0)  # msg/s after an outage; 0 = unlimited


class OutboxConfig(Strict):
    path: Path = Path("/var/lib/edge-agent/outbox")
    max_bytes: int = 2**30
    overflow: Literal["drop_oldest", "refuse"] = "drop_oldest"
    fsync: Literal["always", "batch", "never"] = "batch"
    batch_max: int = Field(512, ge=1)  # most puts in one group commit
    # The largest envelope the outbox takes (413 on the local API): keep it at or under the bridge's
    # max_message_bytes, or the bridge dead-letters what the agent accepted.
    max_message_bytes: int = Field(MAX_MESSAGE_BYTES, ge=4096)

    _parse_size = field_validator("max_bytes", mode="before")(lambda cls, v: parse_bytes(v))


class ModelConfig(Strict):
    path: Path = Path("models/yolox_nano.onnx")
    format: Literal["yolox", "yolov8"] = "yolox"
    input_size: tuple[int, int] = (416, 416)
    threads: int = Field(2, ge=1, le=64)
    confidence: float = Field(0.3, gt=0, lt=1)
    nms_iou: float = Field(0.45, gt=0, le=1)
    classes: list[str] = ["person"]
    providers: list[str] = ["CPUExecutionProvider"]


class LineConfig(Strict):
    id: str = Field(min_length=1)
    points: tuple[Point, Point]
    classes: list[str] | None = None  # None: every class the model reports
    anchor: Literal["bottom_center", "center", "top_center"] = "bottom_center"

    @model_validator(mode="after")
    def _not_degenerate(self) -> "LineConfig":
        if self.points[0] == self.points[1]:
            raise ValueError("a line needs two distinct points")
        return self


class ZoneConfig(Strict):
    id: str = Field(min_length=1)
    polygon: list[Point] = Field(min_length=3)
    classes: list[str] | None = None
    max_occupancy: int | None = Field(None, ge=0)
    anchor: Literal["bottom_center", "center", "top_center"] = "bottom_center"


class CameraConfig(Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    source: str = Field(min_length=1)  # rtsp://…, http://…, /dev/videoN, N, file:///…, or a path
    loop: bool = False
    fps: float = Field(5.0, gt=0, le=120)
    enabled: bool = True
    stall_s: float = Field(10.0, gt=0)  # no frame this long: camera.frame_stall
    reconnect_min_s: float = Field(1.0, gt=0)  # backoff between attempts to (re)open the source
    reconnect_max_s: float = Field(30.0, gt=0)
    down_after_s: float = Field(60.0, gt=0)  # no frames this long: alert.camera_down (once per outage)
    # Stream credentials kept out of the file: put into the URL only when the stream is opened.
    username: str | None = Field(None, min_length=1)
    password_env: str | None = None
    lines: list[LineConfig] = []
    zones: list[ZoneConfig] = []

    @model_validator(mode="after")
    def _unique_ids(self) -> "CameraConfig":
        ids = [x.id for x in self.lines] + [z.id for z in self.zones]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"line/zone ids must be unique per camera: {', '.join(dup)}")
        return self

    @model_validator(mode="after")
    def _credentials_for_a_stream_url(self) -> "CameraConfig":
        if self.username is None and self.password_env is None:
            return self
        if self.username is None:
            raise ValueError("password_env needs a username")
        netloc = urlsplit(self.source.strip()).netloc
        if not netloc:
            raise ValueError("username and password_env apply to a stream URL (rtsp://host/…) only")
        if "@" in netloc:
            raise ValueError("credentials go either in the source URL or in username/password_env, not both")
        return self


class ReportConfig(Strict):
    interval_s: float = Field(60.0, gt=0)


class HttpConfig(Strict):
    listen: str = Field("127.0.0.1:9108", pattern=r"^.+:\d{1,5}$")

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class AgentHttpConfig(HttpConfig):
    # Bounds of the loopback server: beyond max_connections a new connection gets 503 at once,
    # and a connection that sends nothing for read_timeout_s is closed (no thread per idle socket).
    max_connections: int = Field(64, ge=1, le=1024)
    read_timeout_s: float = Field(10.0, gt=0, le=300)


class CommandsConfig(Strict):
    enabled: bool = True
    hmac_secret_env: str | None = None
    window_s: float = Field(60.0, gt=0)


class AgentConfig(Strict):
    device_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    mqtt: AgentMqttConfig = AgentMqttConfig()
    outbox: OutboxConfig = OutboxConfig()
    model: ModelConfig = ModelConfig()
    cameras: list[CameraConfig] = []
    report: ReportConfig = ReportConfig()
    http: AgentHttpConfig = AgentHttpConfig()
    commands: CommandsConfig = CommandsConfig()
    log: LogConfig = LogConfig()
    state_dir: Path | None = None  # persisted counters etc.; default: beside the outbox

    @model_validator(mode="after")
    def _unique_cameras(self) -> "AgentConfig":
        ids = [c.id for c in self.cameras]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"camera ids must be unique: {', '.join(dup)}")
        return self

    @property
    def state_path(self) -> Path:
        return self.state_dir or self.outbox.path.parent / "state"


# --- bridge ----------------------------------------------------------------------------------

class BridgeMqttConfig(MqttConfig):
    share_group: str = Field("bridge", pattern=r"^[^#+/]+$")
    client_id: str = "bridge-1"
    receive_maximum: int = Field(1000, ge=1, le=65535)


class SaslConfig(Strict):
    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    username: str
    password_env: str


class KafkaConfig(Strict):
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl: SaslConfig | None = None
    ssl: TlsConfig | None = None
    producer: dict[str, Any] = {}  # extra librdkafka settings

    @model_validator(mode="after")
    def _sasl_when_needed(self) -> "KafkaConfig":
        if self.security_protocol.startswith("SASL") and self.sasl is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs a sasl section")
        return self


class RetryConfig(Strict):
    max_attempts: int = Field(5, ge=1)
    delay_s: float = Field(2.0, ge=0)
    backoff: Literal["exponential", "fixed"] = "exponential"
    max_delay_s: float = Field(60.0, ge=0)


class DlqConfig(Strict):
    topic: str = "dlq"


class TokenConfig(Strict):
    token_env: str
    role: Literal["admin", "system", "auditor"]


class BridgeHttpConfig(HttpConfig):
    listen: str = Field("127.0.0.1:8080", pattern=r"^.+:\d{1,5}$")
    tokens: list[TokenConfig] = []
    device_id: str | None = None  # envelope device_id of API publishes; default: mqtt.client_id
    docs: bool = False  # serve /docs, /redoc and /openapi.json (off: they map the API for anyone)


class BridgeConfig(Strict):
    mqtt: BridgeMqttConfig = BridgeMqttConfig()
    kafka: KafkaConfig = KafkaConfig()
    retry: RetryConfig = RetryConfig()
    dlq: DlqConfig = DlqConfig()
    http: BridgeHttpConfig = BridgeHttpConfig()
    # uplink stream -> Kafka topic
    topics: dict[str, str] = {s: s for s in STREAMS}
    max_message_bytes: int = MAX_MESSAGE_BYTES  # the agent bounds its envelopes by the same figure
    max_inflight: int = Field(5000, ge=1)  # MQTT messages received and not yet settled
    dedupe_window: int = Field(100_000, ge=0)  # envelope ids remembered
    ack_interval_ms: float = Field(50.0, gt=0)
    ack_batch: int = Field(500, ge=1)
    stall_timeout_s: float = Field(10.0, gt=0)  # no delivery report while records queued: new producer
    log: LogConfig = LogConfig()

    _parse_size = field_validator("max_message_bytes", mode="before")(lambda cls, v: parse_bytes(v))


# --- loading ---------------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _loc_part(part: str | int) -> str:
    """One step of a field path; a key that is not plain is quoted so a problem stays one line."""
    if isinstance(part, int) or _PLAIN_KEY.fullmatch(part):
        return str(part)
    return json.dumps(part[:64] + ("…" if len(part) > 64 else ""))


def _problems(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        path = ".".join(_loc_part(p) for p in e["loc"]) or "(file)"
        msg = " ".join(e["msg"].split())
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {msg}")
    return lines


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


def kind_of(data: dict[str, Any]) -> Literal["agent", "bridge"]:
    """Agent files name a device; bridge files talk to Kafka."""
    if "kafka" in data and "device_id" not in data:
        return "bridge"
    return "agent"


def missing_secrets(cfg: AgentConfig | BridgeConfig) -> list[str]:
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


def parse_agent(data: dict[str, Any]) -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_problems(e)) from e


def parse_bridge(data: dict[str, Any]) -> BridgeConfig:
    try:
        return BridgeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_problems(e)) from e


def load_agent(path: Path) -> AgentConfig:
    return parse_agent(read_yaml(path))


def load_bridge(path: Path) -> BridgeConfig:
    return parse_bridge(read_yaml(path))


def check_file(path: Path) -> tuple[str, list[str]]:
    """Validate a config file of either kind: (kind, problem lines)."""
    try:
        data = read_yaml(path)
    except ConfigError as e:
        return "unknown", e.problems
    kind = kind_of(data)
    try:
        cfg = parse_bridge(data) if kind == "bridge" else parse_agent(data)
    except ConfigError as e:
        return kind, e.problems
    return kind, missing_secrets(cfg)
