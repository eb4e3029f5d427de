"""The bridge's Kafka sink: the watched producer (``producer.ProducerSupervisor``) behind ``sink.Sink``.

librdkafka runs its delivery callbacks inside ``poll``, on the caller's thread, which is what the
sink interface promises anyway; this class only turns a ``KafkaError`` into a ``SendError``
(the record's fault or an outage, ``retry.NOT_THE_RECORDS_FAULT``) and reports the refusals
``produce`` raises at once through the same path.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from confluent_kafka import KafkaError, KafkaException

from edge_agent.bridge.config import KafkaConfig
from edge_agent.bridge.kafka import producer_config
from edge_agent.bridge.producer import ProducerSupervisor, close_producer
from edge_agent.bridge.retry import is_records_fault, is_purge
from edge_agent.bridge.sink import Delivered, Report, SendError

BUFFER_FULL_RETRY_S = 0.05  # librdkafka's queue was full: produce again this soon


def send_error(err: KafkaError) -> SendError:
    """What a delivery error means for the record (``retry`` decides what to do with it)."""
    return SendError(str(err), records_fault=is_records_fault(err), retriable=err.retriable(),
                     retry_after=0.0 if is_purge(err) else None)


class KafkaSink:
    """Records to Kafka through the current producer, replaced when it fails for good or stalls."""

    name = "kafka"
    blocked = False  # librdkafka has no such state: a broker that refuses shows as errors or stalls
    part = None  # librdkafka's threads are its own; its callbacks run in our poll()

    def __init__(self, cfg: KafkaConfig, stall_timeout_s: float, *, max_message_bytes: int,
                 on_outage: Callable[[str], None]):
        conf = producer_config(cfg)
        conf.setdefault("message.max.bytes", max(1_000_000, max_message_bytes + 65536))  # + key and headers
        self._producers = ProducerSupervisor(conf, stall_timeout_s, on_outage=on_outage)
        self._lock = threading.Lock()  # the HTTP API's thread sends too; a swap must not interleave
        self._refused: list[tuple[Report, SendError]] = []  # reported by the next poll
        self._delivered_any = False  # a delivery since the last poll: progress for the stall watch

    @property
    def connected(self) -> bool:
        return self._producers.connected

    def send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]], report: Report) -> None:
        def delivered(err: KafkaError | None, msg: Any) -> None:
            if err is None:
                self._delivered_any = True
                report(None, Delivered(msg.topic(), msg.partition(), msg.offset()))
            else:
                report(send_error(err), None)
        with self._lock:
            try:
                self._producers.producer.produce(topic, value, key, headers=headers, on_delivery=delivered)
            except BufferError:  # librdkafka's queue is full: not the record's fault, try shortly
                self._refused.append((report, SendError("local queue full", records_fault=False,
                                                        retry_after=BUFFER_FULL_RETRY_S)))
            except KafkaException as e:  # refused before sending (e.g. larger than message.max.bytes)
                self._refused.append((report, send_error(e.args[0])))

    def poll(self, timeout: float) -> int:
        with self._lock:
            refused, self._refused = self._refused, []
        for report, err in refused:
            report(err, None)
        served = self._producers.producer.poll(0 if refused else timeout)
        if self._delivered_any:  # one clock read per poll, not per delivery report
            self._delivered_any = False
            self._producers.delivered(time.monotonic())
        return len(refused) + served

    def queued(self) -> int:
        return self._producers.queued()

    def health(self) -> dict[str, Any]:
        return {"connected": self.connected}

    def maintain(self, now: float) -> None:
        """Replace the producer when it failed for good or stopped delivering; its purged records
        come back through the next ``poll`` as outages, to be sent again at once."""
        if not self._producers.needs_replacing(now):
            return
        with self._lock:
            old = self._producers.swap()
        close_producer(old)  # serves the purge reports (they run here, on the caller's thread)

    def close(self) -> None:
        self._producers.close()
