"""The bridge's Kafka producer, watched: built with the callbacks that tell whether Kafka is
reachable, replaced when it fails for good or stops delivering, closed without hanging.

``ProducerSupervisor`` decides and builds; the bridge swaps the producer under its own lock
(the HTTP API's thread produces too), closes the old one and serves the purge reports.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from confluent_kafka import KafkaError, Producer

__all__ = ["ProducerSupervisor", "close_producer"]

log = logging.getLogger(__name__)

MAX_STALL_FACTOR = 8  # a stall's limit doubles with every replacement in a row, up to this many times


class ProducerSupervisor:
    """The current producer, whether a broker is up, and when the producer must be replaced.

    The test broker, restarted, leaves an idempotent producer retrying UNKNOWN_PRODUCER_ID
    for good while a fresh producer delivers at once: a producer that holds records but
    delivered nothing for ``stall_timeout_s`` is replaced. Each replacement in a row doubles
    that wait, so a broker that is simply down does not make us churn producers.
    """

    def __init__(self, conf: dict[str, Any], stall_timeout_s: float, *, on_outage: Callable[[str], None]):
        self._conf = conf
        self._stall_timeout_s = stall_timeout_s
        self._on_outage = on_outage  # a transient Kafka error, for the bridge's rate-limited outage line
        self.connected = False  # whether any broker is UP (librdkafka's statistics, delivery reports)
        self._broken = False  # a fatal producer error: replace it at once
        self._last_delivery = time.monotonic()
        self._progress_at = time.monotonic()
        self._stalls_in_a_row = 0
        self.producer = self._new_producer()

    def queued(self) -> int:
        """Records the producer holds: not yet delivered, failed or purged."""
        return len(self.producer)

    def delivered(self, now: float) -> None:
        """Kafka confirmed a record. Only a delivery is progress: timeouts keep coming from a stuck producer."""
        self._last_delivery = now
        self.connected = True
        self._stalls_in_a_row = 0

    def needs_replacing(self, now: float) -> bool:
        """True when the producer failed for good, or holds records and delivered nothing for too long."""
        if self._broken:
            return True
        if self.queued() == 0:
            self._progress_at = now
            return False
        idle = now - max(self._progress_at, self._last_delivery)
        if idle < self._stall_timeout_s * min(MAX_STALL_FACTOR, 2 ** self._stalls_in_a_row):
            return False
        log.warning("nothing delivered for %.1f s with %d records queued: new Kafka producer", idle, self.queued())
        self._stalls_in_a_row += 1
        return True

    def swap(self) -> Producer:
        """Put a new producer in place; the old one is returned for ``close_producer``.

        The caller holds the lock under which records are produced.
        """
        self._progress_at = time.monotonic()
        self._broken = False
        old, self.producer = self.producer, self._new_producer()
        return old

    def close(self) -> None:
        close_producer(self.producer)

    def _new_producer(self) -> Producer:
        conf = dict(self._conf)
        conf["error_cb"] = self._on_error
        conf["stats_cb"] = self._on_stats
        return Producer(conf)

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.connected = False
        if err.fatal():
            log.error("Kafka producer failed for good (%s): replacing it", err)
            self._broken = True
        else:
            self._on_outage(f"Kafka: {err}")

    def _on_stats(self, stats_json: str) -> None:
        brokers = json.loads(stats_json).get("brokers", {})
        self.connected = any(b.get("state") == "UP" for b in brokers.values())


def close_producer(producer: Producer) -> None:
    """Purge first: close() alone would wait for a broker that may never answer."""
    producer.purge(in_queue=True, in_flight=True)
    producer.flush(5.0)  # serves the purge reports
    producer.close()
