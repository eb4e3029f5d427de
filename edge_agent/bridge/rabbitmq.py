"""The bridge's RabbitMQ sink: persistent messages with publisher confirms, one I/O thread.

pika's ``SelectConnection`` is the client: with confirms handled as they arrive (not one
publish waiting for its confirm, as ``BlockingConnection`` and amqpstorm do) it is the only one
of pika, aio-pika and amqpstorm that reaches the bridge's rate (docs/bridge.md has the
measurement, ``scripts/bench_amqp_clients.py`` makes it). Its I/O loop runs in the sink's own
thread ``rabbitmq-io``; the bridge's loop hands records over with ``send`` (one wake-up of the
I/O loop per batch) and runs the reports in ``poll``, on its own thread, as with Kafka.

What counts as what (the same guarantee as on Kafka, ``sink.SendError``):

* a confirm (basic.ack) is success, unless the broker returned the message first as
  unroutable (``mandatory``): that is the record's fault, retried and in the end dead-lettered;
* a basic.nack is the broker's refusal of the record: an attempt, retried;
* a lost connection, or a message unconfirmed for ``confirm_timeout_s`` while the connection
  is not blocked, is an outage: the record is reported back to be sent again, never counted;
* a blocked connection (RabbitMQ's memory or disk alarm) publishes nothing until it is
  unblocked; what it holds waits, nothing is acked meanwhile.
"""

from __future__ import annotations

import itertools
import logging
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import pika
from pika.adapters.select_connection import SelectConnection

from edge_agent.bridge.rabbitmq_config import RabbitMqConfig
from edge_agent.bridge.sink import Delivered, Report, SendError
from edge_agent.common.backoff import Backoff
from edge_agent.common.supervised import SupervisedThread

log = logging.getLogger(__name__)
# pika logs every failed connection attempt at ERROR with its stack; the sink says it once, through
# the bridge's rate-limited outage line (on_outage), so pika's own lines would only repeat it.
logging.getLogger("pika").setLevel(logging.CRITICAL)

CONFIRM_CHECK_S = 1.0  # how often the I/O thread looks for overdue confirms
_LOST = "RabbitMQ connection lost before the broker confirmed"


def connection_parameters(cfg: RabbitMqConfig) -> pika.ConnectionParameters:
    """pika's parameters for ``cfg``: the URL's host, port, user and vhost, the password from its
    variable (ConfigError when unset), TLS from ``tls`` (CA, client certificate) for amqps://."""
    ssl_options = None
    if cfg.tls_on:
        context = ssl.create_default_context(cafile=str(cfg.tls.ca) if cfg.tls and cfg.tls.ca else None)
        if cfg.tls and cfg.tls.cert and cfg.tls.key:
            context.load_cert_chain(str(cfg.tls.cert), str(cfg.tls.key))
        if cfg.tls and cfg.tls.insecure:
            context.check_hostname = False  # as on MQTT and Kafka: the chain is checked, the name is not
        ssl_options = pika.SSLOptions(context, server_hostname=cfg.host)
    return pika.ConnectionParameters(
        host=cfg.host, port=cfg.port, virtual_host=cfg.vhost,
        credentials=pika.PlainCredentials(cfg.username, cfg.password()), ssl_options=ssl_options,
        heartbeat=cfg.heartbeat_s, connection_attempts=1, socket_timeout=5.0)


def routing_key(kafka_key: bytes) -> str:
    """``<device>.<camera>`` (``_`` for no camera) from the bridge's record key ``<device>/<camera>``."""
    device, _, camera = kafka_key.decode("utf-8", "replace").partition("/")
    return f"{device}.{camera or '_'}"


def message_properties(headers: list[tuple[str, bytes]]) -> pika.BasicProperties:
    """The DESIGN properties: JSON, persistent, message_id = envelope id, the Kafka headers as strings."""
    table = {k: v.decode("utf-8", "replace") for k, v in headers}
    return pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                message_id=table.get("message-id"),
                                correlation_id=table.get("trace-id"),
                                timestamp=int(time.time()), headers=table)


def queue_arguments(cfg: RabbitMqConfig, stream: str) -> dict[str, Any]:
    args: dict[str, Any] = {"x-queue-type": cfg.queue_type}
    if stream == "dlq":
        args["x-message-ttl"] = cfg.dlq_retention_s * 1000
    return args


@dataclass
class _Pending:
    topic: str
    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    report: Report
    sent_at: float = 0.0
    returned: str | None = None  # the broker's reply text when it returned the message unroutable


class RabbitSink:
    """Publishes to the configured exchanges with confirms; see the module docstring for the rules.

    ``part`` is its I/O thread as a supervised part: the owner adds it to its health and starts it.
    """

    name = "rabbitmq"

    def __init__(self, cfg: RabbitMqConfig, *, on_outage: Callable[[str], None] = lambda _m: None):
        self._cfg = cfg
        self._params = connection_parameters(cfg)
        self._on_outage = on_outage
        self._lock = threading.Lock()
        self._handed: deque[_Pending] = deque()  # from send(), not yet published (any thread -> I/O thread)
        self._unconfirmed: dict[int, _Pending] = {}  # delivery tag -> record (I/O thread only)
        self._reports: deque[tuple[Report, SendError | None, Delivered | None]] = deque()
        self._reported = threading.Event()
        self._conn: SelectConnection | None = None
        self._channel: Any = None
        self._ready = False  # channel open, topology declared, confirms on
        self._tag = 0
        self._flush_due = False
        self._stopping = threading.Event()
        self.connected = False
        self.blocked = False
        self.last_error = ""
        # A crash of the I/O loop loses nothing: what it had not confirmed is reported as lost
        # (_lose_unconfirmed), what it had not published is still handed; the restart reconnects.
        self.part = SupervisedThread("rabbitmq-io", self._io_main, on_restart=self._after_crash)

    # --- the caller's side ---------------------------------------------------------------

    def start(self) -> "RabbitSink":
        """Start the I/O thread (for a sink used without a health registry: tests, benchmarks)."""
        self.part.start()
        return self

    def send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]], report: Report) -> None:
        exchange = self._cfg.exchanges.get(topic)
        if exchange is None:
            self._report(report, SendError(f"no exchange configured for {topic!r}", records_fault=True,
                                           retriable=False), None)
            return
        item = _Pending(topic, exchange, routing_key(key), value, message_properties(headers), report)
        with self._lock:
            self._handed.append(item)
            wake = not self._flush_due and self._conn is not None
            self._flush_due = self._flush_due or wake
            conn = self._conn
        if wake and conn is not None:
            self._call_in_io(conn, self._flush)

    def poll(self, timeout: float) -> int:
        if not self._reports and timeout > 0:
            self._reported.wait(timeout)
        self._reported.clear()
        n = 0
        while self._reports:
            report, err, where = self._reports.popleft()
            report(err, where)
            n += 1
        return n

    def queued(self) -> int:
        with self._lock:
            return len(self._handed) + len(self._unconfirmed)

    def maintain(self, now: float) -> None:
        """Nothing to do on the caller's thread: the I/O thread watches its own confirms."""

    def health(self) -> dict[str, Any]:
        return {"connected": self.connected, "blocked": self.blocked, "queued": self.queued(),
                **({"error": self.last_error} if self.last_error and not self.connected else {})}

    def close(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:
            conn = self._conn
        if conn is not None:
            self._call_in_io(conn, lambda: self._close_connection(conn))
        self.part.stop_restarting()
        self.part.join(timeout)
        self._fail_all_handed()

    # --- the I/O thread ---------------------------------------------------------------------

    def _after_crash(self) -> None:
        with self._lock:
            self._conn, self._flush_due = None, False
        self._lose_unconfirmed()
        self._ready_once_and_reset()

    def _io_main(self) -> None:
        backoff = Backoff(0.2, 5.0)
        while not self._stopping.is_set():
            conn = SelectConnection(self._params, on_open_callback=self._on_open,
                                    on_open_error_callback=self._on_open_error, on_close_callback=self._on_closed)
            with self._lock:
                self._conn = conn
            conn.ioloop.start()  # until the connection closes
            with self._lock:
                self._conn, self._flush_due = None, False
            self._lose_unconfirmed()
            if self._stopping.wait(0.0 if self._ready_once_and_reset() else backoff.next_delay()):
                break
        log.info("RabbitMQ sink stopped")

    def _ready_once_and_reset(self) -> bool:
        """Whether the connection that just ended had worked (then reconnect at once); resets state."""
        was, self._ready, self._channel = self._ready, False, None
        self.connected = self.blocked = False
        return was

    def _call_in_io(self, conn: SelectConnection, fn: Callable[[], None]) -> None:
        try:
            conn.ioloop.add_callback_threadsafe(fn)
        except Exception:  # noqa: BLE001 - the loop is closing: the records stay handed and go after reconnect
            pass

    def _on_open(self, conn: SelectConnection) -> None:
        conn.add_on_connection_blocked_callback(self._on_blocked)
        conn.add_on_connection_unblocked_callback(self._on_unblocked)
        conn.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, conn: SelectConnection, err: BaseException) -> None:
        self._outage(f"RabbitMQ: cannot connect to {self._cfg.host}:{self._cfg.port}: {err}")
        conn.ioloop.stop()

    def _on_closed(self, conn: SelectConnection, reason: BaseException) -> None:
        if not self._stopping.is_set():
            self._outage(f"RabbitMQ connection closed: {reason}")
        conn.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        steps = self._topology_steps(channel)
        steps.append(lambda done: channel.confirm_delivery(self._on_confirm, callback=done))

        def run(i: int) -> None:
            if i == len(steps):
                self._on_ready()
            else:
                steps[i](lambda _frame: run(i + 1))
        run(0)

    def _topology_steps(self, channel: Any) -> list[Callable[[Callable], None]]:
        """Declare every exchange (durable topic) and queue (durable, bound with ``#``), in order."""
        steps: list[Callable[[Callable], None]] = []
        for stream, exchange in self._cfg.exchanges.items():
            queue = self._cfg.queues[stream]
            args = queue_arguments(self._cfg, stream)
            steps += [
                lambda done, e=exchange: channel.exchange_declare(e, "topic", durable=True, callback=done),
                lambda done, q=queue, a=args: channel.queue_declare(q, durable=True, arguments=a, callback=done),
                lambda done, q=queue, e=exchange: channel.queue_bind(q, e, "#", callback=done),
            ]
        return steps

    def _on_ready(self) -> None:
        self._ready, self._tag = True, 0
        self.connected, self.last_error = True, ""
        log.info("RabbitMQ connected (%s:%d vhost %s), topology declared", self._cfg.host, self._cfg.port,
                 self._cfg.vhost)
        assert self._conn is not None
        self._conn.ioloop.call_later(CONFIRM_CHECK_S, self._check_overdue)
        self._flush()

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        # e.g. a queue declared before with other arguments (PRECONDITION_FAILED): say so, reconnect later.
        if not self._stopping.is_set():
            self._outage(f"RabbitMQ channel closed: {reason}")
        self._ready = False
        if self._conn is not None and self._conn.is_open:
            self._conn.close()

    def _on_blocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = True
        self._outage("RabbitMQ blocked this connection (a memory or disk alarm): publishing paused")

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = False
        log.info("RabbitMQ unblocked the connection")
        self._flush()

    def _flush(self) -> None:
        """Publish what was handed over (I/O thread), unless the channel is not ready or blocked."""
        with self._lock:
            self._flush_due = False
            if not self._ready or self.blocked:
                return
            items, self._handed = self._handed, deque()
        now = time.monotonic()
        for i, item in enumerate(items):
            try:
                self._channel.basic_publish(item.exchange, item.routing_key, item.body, item.properties,
                                            mandatory=True)
            except Exception as e:  # noqa: BLE001 - the channel went away mid-batch: the rest waits
                log.warning("RabbitMQ publish failed (%s); %d records wait for the connection", e, len(items) - i)
                with self._lock:
                    self._handed.extendleft(reversed(list(items)[i:]))
                return
            self._tag += 1
            item.sent_at = now
            self._unconfirmed[self._tag] = item

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        """An unroutable message (``mandatory``): its confirm follows; mark the oldest unconfirmed match."""
        for item in self._unconfirmed.values():
            if item.returned is None and item.properties.message_id == properties.message_id:
                item.returned = f"unroutable: {method.reply_code} {method.reply_text}"
                return

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ack = isinstance(method, pika.spec.Basic.Ack)
        if method.multiple:  # tags are handed out in order: the confirmed ones are at the front
            tags = list(itertools.takewhile(lambda t: t <= method.delivery_tag, self._unconfirmed))
        else:
            tags = [method.delivery_tag]
        for tag in tags:
            item = self._unconfirmed.pop(tag, None)
            if item is None:
                continue
            if not ack:
                err: SendError | None = SendError("nacked by RabbitMQ", records_fault=True)
            else:
                err = SendError(item.returned, records_fault=True) if item.returned is not None else None
            self._reports.append((item.report, err, None if err else Delivered(item.topic)))
        self._reported.set()  # once per confirm (RabbitMQ confirms many at a time), not per record

    def _check_overdue(self) -> None:
        """A confirm this late on a connection that is not blocked: the connection is stuck; start over."""
        if not self._ready or self._conn is None:
            return
        limit = time.monotonic() - self._cfg.confirm_timeout_s
        if not self.blocked and any(item.sent_at < limit for item in self._unconfirmed.values()):
            self._outage(f"RabbitMQ confirmed nothing for {self._cfg.confirm_timeout_s:.0f} s: reconnecting")
            self._conn.close()
            return
        self._conn.ioloop.call_later(CONFIRM_CHECK_S, self._check_overdue)

    def _close_connection(self, conn: SelectConnection) -> None:
        if conn.is_open:
            conn.close()
        else:
            conn.ioloop.stop()

    def _lose_unconfirmed(self) -> None:
        """The connection is gone: whatever it did not confirm goes back to the caller, not counted."""
        lost, self._unconfirmed = self._unconfirmed, {}
        for item in lost.values():
            self._report(item.report, SendError(_LOST, records_fault=False, retry_after=0.0), None)

    def _fail_all_handed(self) -> None:
        with self._lock:
            handed, self._handed = self._handed, deque()
        for item in handed:
            self._report(item.report, SendError("the RabbitMQ sink is closed", records_fault=False, retry_after=0.0), None)

    def _report(self, report: Report, err: SendError | None, where: Delivered | None) -> None:
        self._reports.append((report, err, where))
        self._reported.set()

    def _outage(self, text: str) -> None:
        self.last_error = text
        self._on_outage(text)
