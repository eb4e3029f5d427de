"""check-config: tells an agent, bridge or consumer file apart and validates it.

Beyond the config models (which ``run`` and a remote ``set_config`` apply too), it checks what
the daemons would meet later on this host: the ``*_env`` secrets (from the environment, or from
the unit's EnvironmentFile with ``--env-file``) and the files the config names (model, TLS).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from edge_agent.agent.config import parse_agent
from edge_agent.bridge.config import parse_bridge
from edge_agent.common.config import ConfigError, missing_secrets, read_yaml
from edge_agent.consumer.config import parse_consumer


def kind_of(data: dict[str, Any]) -> Literal["agent", "bridge", "consumer"]:
    """Agent files name a device; consumer files name a sink; bridge files talk to Kafka or RabbitMQ."""
    if "sink" in data and "device_id" not in data:
        return "consumer"
    if ("kafka" in data or "rabbitmq" in data) and "device_id" not in data:
        return "bridge"
    return "agent"


def check_file(path: Path, *, env: Mapping[str, str] | None = None, files: bool = True) -> tuple[str, list[str]]:
    """Validate a config file of either kind: (kind, problem lines).

    ``env``: the environment the daemon will have (default: this process's). ``files=False`` skips
    the files the config names, for a config checked away from the host it is meant for.
    """
    try:
        data = read_yaml(path)
    except ConfigError as e:
        return "unknown", e.problems
    kind = kind_of(data)
    try:
        parse = {"bridge": parse_bridge, "consumer": parse_consumer}.get(kind, parse_agent)
        cfg = parse(data)
    except ConfigError as e:
        return kind, e.problems
    return kind, missing_secrets(cfg, env) + (cfg.file_problems() if files else [])
