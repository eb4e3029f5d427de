"""What the bridge's loop needs of a central broker, whichever it is (Kafka or RabbitMQ).

A sink takes records with ``send`` and reports each one exactly once, through the callback given
to ``send``, from inside ``poll`` (so the reports run on the caller's thread, the bridge's loop).
A failed report carries a ``SendError`` that says whether the failure is the record's fault (it
counts as an attempt and may end in the dead-letter queue) or the broker's (an outage: the
record is sent again and never dead-lettered because the broker was away).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from edge_agent.common.supervised import SupervisedThread


@dataclass(frozen=True)
class SendError:
    text: str
    records_fault: bool  # counts as an attempt (False: an outage, the record waits for the broker)
    retriable: bool = True  # only for records_fault: may succeed if sent again (else dead-letter at once)
    retry_after: float | None = None  # an outage's own wait before sending again (None: the policy's)


@dataclass(frozen=True)
class Delivered:
    """Where the broker put a record (Kafka: partition and offset; RabbitMQ: the exchange only)."""

    topic: str
    partition: int | None = None
    offset: int | None = None

    def as_dict(self) -> dict:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


Report = Callable[[SendError | None, Delivered | None], None]


class Sink(Protocol):
    name: str  # "kafka" or "rabbitmq": the key of its state in health
    connected: bool
    blocked: bool  # connected, but the broker refuses publishes for now (RabbitMQ's alarms)
    part: SupervisedThread | None  # a thread of its own, for the owner's health and start (or None)

    def send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]], report: Report) -> None:
        """Hand a record over; ``report`` runs once, from ``poll``."""

    def poll(self, timeout: float) -> int:
        """Run the reports that are ready, waiting at most ``timeout`` for the first; how many ran."""

    def queued(self) -> int:
        """Records handed over and not yet reported."""

    def maintain(self, now: float) -> None:
        """The caller's periodic look after the connection (Kafka: replace a stalled producer)."""

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` and ``/api/v1/status`` show of the broker (``connected`` at least)."""

    def close(self) -> None:
        """Stop; records not yet confirmed are reported as outages by the next ``poll``."""

