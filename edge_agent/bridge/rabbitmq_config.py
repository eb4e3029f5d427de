"""The ``rabbitmq`` section of a bridge file: where the broker is, how to log in, the topology."""

from __future__ import annotations

import os
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator, model_validator

from edge_agent.common.config import ConfigError, Strict, TlsConfig

# The specification's topology: stream (the bridge's topic names) -> exchange, -> queue.
DEFAULT_EXCHANGES = {"camera.events": "camera.events", "ai.inference.results": "ai.inference",
                     "notifications": "notifications", "audit.logs": "audit.logs", "dlq": "dlq"}
DEFAULT_QUEUES = {"camera.events": "camera.queue", "ai.inference.results": "ai.queue",
                  "notifications": "notification.queue", "audit.logs": "audit.queue", "dlq": "dlq.queue"}
WEEK_S = 7 * 24 * 3600


class RabbitMqConfig(Strict):
    url: str = "amqp://guest@127.0.0.1:5672/%2F"  # user@host:port/vhost; the password comes from password_env
    password_env: str | None = None
    tls: TlsConfig | None = None  # amqps: CA and client certificate (default: the system's CAs)
    exchanges: dict[str, str] = dict(DEFAULT_EXCHANGES)
    queues: dict[str, str] = dict(DEFAULT_QUEUES)
    dlq_retention_s: int = Field(WEEK_S, ge=1)  # message TTL of the dlq queue
    queue_type: Literal["classic", "quorum"] = "classic"
    heartbeat_s: int = Field(30, ge=0)
    confirm_timeout_s: float = Field(30.0, gt=0)  # unconfirmed this long while not blocked: reconnect

    @field_validator("url")
    @classmethod
    def _plain_amqp_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError("must start with amqp:// or amqps://")
        if parts.password is not None:
            raise ValueError("never put a password in the URL: name its variable in password_env")
        if not parts.hostname:
            raise ValueError("names no host")
        try:
            port = parts.port
        except ValueError as e:
            raise ValueError(f"bad port: {e}") from None
        if port == 0:
            raise ValueError("bad port: 0")
        return v

    @model_validator(mode="after")
    def _every_stream_routed(self) -> "RabbitMqConfig":
        if set(self.exchanges) != set(self.queues):
            raise ValueError("exchanges and queues must name the same streams")
        if "dlq" not in self.exchanges:
            raise ValueError("exchanges must include dlq")
        return self

    @property
    def tls_on(self) -> bool:
        return urlsplit(self.url).scheme == "amqps"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (5671 if self.tls_on else 5672)

    @property
    def username(self) -> str:
        return unquote(urlsplit(self.url).username or "guest")

    @property
    def vhost(self) -> str:
        """The URL's path, unquoted; none or empty is the default vhost ``/``."""
        path = urlsplit(self.url).path
        return unquote(path[1:]) if len(path) > 1 else "/"

    def password(self) -> str:
        """The password from ``password_env`` (``guest`` without one); ConfigError when unset."""
        if self.password_env is None:
            return "guest"
        value = os.environ.get(self.password_env)
        if value is None:
            raise ConfigError([f"rabbitmq.password_env: environment variable {self.password_env} is not set"])
        return value

    def file_problems(self) -> list[str]:
        return self.tls.file_problems("rabbitmq.tls") if self.tls else []
