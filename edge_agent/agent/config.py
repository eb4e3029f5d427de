"""The camera host's config file (``edge-agent run -c agent.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from edge_agent.common.config import (
    HttpConfig,
    LogConfig,
    MqttConfig,
    Strict,
    parse_bytes,
    parse_config,
    read_yaml,
)
from edge_agent.common.envelope import MAX_MESSAGE_BYTES
from edge_agent.vision.config import CameraConfig, LineConfig, ModelConfig, ZoneConfig, unknown_classes


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


class ReportConfig(Strict):
    interval_s: float = Field(60.0, gt=0)


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

    @model_validator(mode="after")
    def _lines_and_zones_count_what_the_model_keeps(self) -> "AgentConfig":
        """A line or zone class the detector drops would never be counted (and an unknown one stops
        the camera): refused here, each at its own path."""
        errors = [InitErrorDetails(type=PydanticCustomError("class_not_counted", problem),
                                   loc=("cameras", i, kind, j, "classes"), input=item.classes)
                  for i, camera in enumerate(self.cameras)
                  for kind, items in (("lines", camera.lines), ("zones", camera.zones))
                  for j, item in enumerate(items)
                  if (problem := self._class_problem(item))]
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def _class_problem(self, item: LineConfig | ZoneConfig) -> str | None:
        if not item.classes:
            return None
        names = self.model.class_names()
        unknown = unknown_classes(item.classes, names) if names is not None else None
        if unknown:
            return unknown
        dropped = [c for c in item.classes if self.model.classes and c not in self.model.classes]
        if not dropped:
            return None
        kept = f"model.classes [{', '.join(self.model.classes)}]"
        if len(dropped) == 1:
            return f"class {dropped[0]!r} is not in {kept}: the detector drops it, so it is never counted"
        return (f"classes {', '.join(repr(c) for c in dropped)} are not in {kept}: the detector drops them, "
                "so they are never counted")

    def file_problems(self) -> list[str]:
        """Files this config names that the agent could not read (check-config; ``run`` meets them later)."""
        problems = self.mqtt.tls.file_problems("mqtt.tls") if self.mqtt.tls else []
        if self.cameras:  # the model is loaded for the first camera; a relay-only agent needs none
            problems += self.model.file_problems("model")
        return problems

    @property
    def state_path(self) -> Path:
        return self.state_dir or self.outbox.path.parent / "state"


def parse_agent(data: dict[str, Any]) -> AgentConfig:
    return parse_config(AgentConfig, data)


def load_agent(path: Path) -> AgentConfig:
    return parse_agent(read_yaml(path))
