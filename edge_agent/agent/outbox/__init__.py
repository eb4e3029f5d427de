"""The durable outbox: ``store`` (the writer and group commit), ``index`` (which seq waits, which
is in flight), ``layout`` (the files), ``view`` (a read-only look for ``edge-agent outbox``)."""

from edge_agent.agent.outbox.layout import envelope_time, stored_entries
from edge_agent.agent.outbox.store import (
    EnvelopeTooLarge,
    Outbox,
    OutboxBusy,
    OutboxClosed,
    OutboxDiskFull,
    OutboxFull,
    OutboxUnavailable,
    StoredEntry,
    refusal_reason,
)
from edge_agent.agent.outbox.view import OutboxView

__all__ = ["EnvelopeTooLarge", "Outbox", "OutboxBusy", "OutboxClosed", "OutboxDiskFull", "OutboxFull",
           "OutboxUnavailable", "OutboxView", "StoredEntry", "envelope_time", "refusal_reason", "stored_entries"]
