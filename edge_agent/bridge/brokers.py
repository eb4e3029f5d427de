"""Which central broker a bridge file names, as a ``sink.Sink`` (each client library imported only when chosen)."""

from __future__ import annotations

from typing import Callable

from edge_agent.bridge.config import BridgeConfig
from edge_agent.bridge.sink import Sink


def open_sink(cfg: BridgeConfig, *, on_outage: Callable[[str], None]) -> Sink:
    if cfg.rabbitmq is not None:
        from edge_agent.bridge.rabbitmq import RabbitSink

        return RabbitSink(cfg.rabbitmq, on_outage=on_outage)
    from edge_agent.bridge.kafka_sink import KafkaSink

    return KafkaSink(cfg.kafka, cfg.stall_timeout_s, max_message_bytes=cfg.max_message_bytes, on_outage=on_outage)
