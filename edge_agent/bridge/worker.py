"""The MQTT -> Kafka (or RabbitMQ) bridge's worker (``edge-agent bridge -c bridge.yaml``).

The central broker is behind ``sink.Sink`` (``kafka_sink``, ``rabbitmq``): the loop below
says "Kafka" for it, and means whichever the file names; its reports run in this loop either way.

One worker thread owns both clients and runs one loop:

* it reads MQTT only while fewer than ``max_inflight`` messages are unsettled
  (Mosquitto issue #2301: one PUBACK can release a whole new window, so the
  broker's receive maximum is not a bound), validates each batch (``validate``)
  and hands it to the producer;
* it serves the producer's delivery reports: it PUBACKs the MQTT message
  (manual ack) only once Kafka has the record or its dead letter, batches the
  end-to-end acks (``inflight``), re-sends failed records with backoff
  (``retry``) and replaces a stalled producer (``producer``).

Why one thread: confluent-kafka takes the GIL once per delivery report. With the
reports served by a second thread, every report waited for the MQTT thread to
give up the GIL (up to the interpreter's switch interval), which capped the drain
rate and made the latency tail. In one thread the reports cost no hand-over. While
Kafka owes reports, the loop waits on the MQTT socket for at most
``KAFKA_WAIT_S`` at a time (a message wakes it at once). The HTTP API's thread
only calls ``submit`` (``Producer.produce`` is thread-safe). The MQTT side speaks 3.1.1
through paho's external event loop API: paho parses a v5 PUBLISH with a properties
object per message, the slow part of a v5 bridge (docs/bridge.md has the measurements).

Policy for failures (see README "The bridge" and ``retry``):

* a record that times out or is purged (broker down, broker stuck) is not
  poison: it is sent again and never counts as an attempt, so an outage holds
  acks and does not fill the DLQ;
* an error the broker returns about the record counts as an attempt; retriable
  ones are retried with exponential backoff and jitter up to
  ``retry.max_attempts`` (then ``retries_exhausted``), the others are
  dead-lettered at once (``rejected``).
"""

from __future__ import annotations

import logging
import select
import threading
import time
from concurrent.futures import Future
from functools import partial
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.bridge.config import BridgeConfig
from edge_agent.bridge.inflight import (
    AckBatcher,
    DeadLettered,
    DedupeKey,
    MessageTag,
    RecentIds,
    Record,
)
from edge_agent.bridge.kafka import dlq_headers
from edge_agent.bridge.retry import RetryHeap, plan_after_failure
from edge_agent.bridge.brokers import open_sink
from edge_agent.bridge.sink import Delivered, SendError
from edge_agent.bridge.validate import Accepted, Rejected, classify
from edge_agent.common import logs
from edge_agent.common.backoff import Backoff
from edge_agent.common.envelope import Envelope, encode, utc_now_iso
from edge_agent.common.metrics import (
    BRIDGE_BROKER_UP,
    BRIDGE_DELIVERY_SECONDS,
    BRIDGE_DLQ,
    BRIDGE_DUPLICATES,
    BRIDGE_INFLIGHT,
    BRIDGE_PRODUCED,
    BRIDGE_RECEIVED,
    BRIDGE_RETRIES,
)
from edge_agent.common.mqtt import configure_transport
from edge_agent.common.supervised import Health, SupervisedThread
from edge_agent.common.wire import (
    DLQ_ORIGINAL_BYTES,
    ack_topic,
    encode_ack,
    uplink_subscription,
)

__all__ = ["Bridge", "DeadLettered"]

log = logging.getLogger(__name__)

# A too-large message cannot go to Kafka whole; its dead letter keeps this much.
TOO_LARGE_KEEP_BYTES = 64 * 1024
MAX_READ_BATCH = 64  # read this many, then hand them to Kafka: batches amortise locks, small ones keep Kafka busy

_RUNNING, _DRAINING = "running", "draining"
# While Kafka owes delivery reports, serve them at least this often. It also paces reading:
# Mosquitto (Nagle on by default) sends the next PUBLISH once our TCP ACK comes, which rides
# on the PUBACKs we write after the reports. Shorter waits cost CPU, longer ones latency, and
# ACKing every segment at once (TCP_QUICKACK) woke us per message: docs/bridge.md.
KAFKA_WAIT_S = 0.002
IDLE_WAIT_S = 0.05  # otherwise wait on the MQTT socket this long at most


class Bridge:
    """MQTT (shared subscription, manual ack) -> validated -> Kafka (idempotent), with e2e acks."""

    def __init__(self, cfg: BridgeConfig, *, restart_backoff_s: float = 0.5, max_restarts: int = 5):
        self.config = cfg
        self._cfg = cfg
        self._lock = threading.RLock()  # guards the bookkeeping below against the HTTP API's thread
        self._phase = _RUNNING
        self._drain_deadline = 0.0  # once stopping: give up waiting for Kafka at this time.monotonic()
        self._inflight = 0  # MQTT messages received, not yet PUBACKed
        self._api_pending = 0
        self._by_id: dict[DedupeKey, Record] = {}  # (device, envelope id) -> record not yet confirmed
        self._recent = RecentIds(cfg.dedupe_window)
        self._acks = AckBatcher(cfg.ack_interval_ms / 1000, cfg.ack_batch)
        self._retries: RetryHeap[Record] = RetryHeap()
        self._conn = 0  # MQTT connection number: mids of older connections are not ours to ack
        self._mqtt_connected = False
        self._outage_logged_at = 0.0
        self._sink = open_sink(cfg, on_outage=self._log_outage)  # Kafka or RabbitMQ (brokers.py)
        self._broker_up = BRIDGE_BROKER_UP.labels(self._sink.name)
        self._client = self._new_mqtt_client()
        # The long-lived parts, for /healthz and the watchdog (serve_http adds "http").
        self.parts = Health()
        self._worker = SupervisedThread("bridge-worker", self._run, on_restart=self._after_crash,
                                        backoff_min_s=restart_backoff_s, max_restarts=max_restarts)
        self.parts.add(self._worker)
        if self._sink.part is not None:
            self.parts.add(self._sink.part)  # the RabbitMQ sink's I/O thread
        self._reconnect_at = 0.0
        self._reconnect_backoff = Backoff(cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s)
        # Filled by callbacks, emptied in batches by the loop: messages read, delivery reports.
        self._incoming: list[tuple[str, bytes, int]] = []
        self._reports: list[tuple[Record, SendError | None, Delivered | None]] = []
        self._e2e_sent: list[mqtt.MQTTMessageInfo] = []  # e2e acks the broker has not confirmed yet

    # --- public --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._sink.part is not None:
            self._sink.part.start()
        self._worker.start()
        log.info("bridge started", extra={"topic": self.subscription})

    @property
    def subscription(self) -> str:
        return uplink_subscription(self._cfg.mqtt.topic_prefix, self._cfg.mqtt.share_group)

    def submit(self, kafka_topic: str, envelope: Envelope, *, key: str | None = None) -> Future:
        """Send an envelope to Kafka on the same path as MQTT traffic (retry, backoff, DLQ).

        The future resolves to ``{"topic", "partition", "offset"}`` once Kafka confirms,
        or fails with DeadLettered once the record went to the DLQ instead.
        """
        future: Future = Future()
        rec = Record(topic=kafka_topic, key=(key or envelope.kafka_key).encode(), value=encode(envelope),
                     headers=envelope.kafka_headers(), source="api", received=time.monotonic(),
                     dedupe_key=(envelope.device_id, envelope.id), future=future)
        with self._lock:
            if self._phase != _RUNNING:
                raise RuntimeError("the bridge is shutting down")
            self._api_pending += 1
            self._send(rec)
        return future

    def alive(self) -> bool:
        """No part has died for good (one that did means: no more watchdog pings, systemd restarts us)."""
        return not self.parts.dead()

    def health(self) -> dict[str, Any]:
        """What is connected, what is in flight, and each long-lived part's state (``dead``: given up)."""
        with self._lock:
            out: dict[str, Any] = {"mqtt": {"connected": self._mqtt_connected},
                                   self._sink.name: self._sink.health(),
                                   "inflight": self._inflight + self._api_pending}
        out["parts"] = self.parts.report()
        out["dead"] = self.parts.dead()
        return out

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop reading, let Kafka confirm what is in flight, ack it, disconnect. True if all settled."""
        with self._lock:
            if self._phase == _RUNNING:
                self._phase = _DRAINING
                self._drain_deadline = time.monotonic() + timeout
        self._worker.stop_restarting()
        if self._worker.is_alive():
            self._worker.join(timeout + 10)  # it settles what it can, sends the e2e acks and disconnects
        with self._lock:
            unsettled = self._inflight + self._api_pending
        if unsettled:
            log.warning("stopping with %d messages unsettled: the broker will deliver them again", unsettled)
        self._sink.close()
        log.info("bridge stopped", extra={"topic": self.subscription})
        return unsettled == 0

    # --- MQTT side -----------------------------------------------------------------------------

    def _new_mqtt_client(self) -> mqtt.Client:
        m = self._cfg.mqtt
        # MQTT 3.1.1, persistent session: the broker queues while we are away, until its
        # persistent_client_expiration; its max_inflight_messages is the window it sends ahead.
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=m.client_id, protocol=mqtt.MQTTv311,
                             clean_session=False, manual_ack=True)
        configure_transport(client, m)
        client.max_inflight_messages_set(1000)  # our own QoS 1 publishes: the e2e acks
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        # With this hook set, paho queues the PUBACKs and e2e acks we hand it and our loop
        # writes them once per pass (paho's external event loop API), not as each is made.
        client.on_socket_register_write = lambda *_: None
        client.connect_async(m.host, m.port, keepalive=m.keepalive_s)
        return client

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("MQTT broker refused the connection: %s", reason)
            return
        with self._lock:
            self._conn += 1
            self._mqtt_connected = True
        client.subscribe(self.subscription, qos=1)
        log.info("MQTT connected (session present: %s)", flags.session_present, extra={"topic": self.subscription})

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        with self._lock:
            self._mqtt_connected = False
        if self._phase == _RUNNING:
            log.warning("MQTT disconnected: %s", reason)

    def _reading_allowed(self) -> bool:
        return self._phase == _RUNNING and self._inflight < self._cfg.max_inflight

    def _run(self) -> None:
        """The worker: serve Kafka, read MQTT (while there is room), repeat; once stopping, drain and disconnect."""
        while not (self._phase != _RUNNING and (self._settled() or time.monotonic() >= self._drain_deadline)):
            self._serve_broker()
            if not self._mqtt_connected:
                self._connect_when_due()
                continue
            if self._reading_allowed():
                rc = self._read_batch(self._mqtt_wait_s())
                self._handle_incoming()
            else:
                # Full (or draining): do not read; wait for delivery reports, keep writing acks and pings.
                self._sink.poll(0.01)
                rc = self._client.loop_write()
                if rc == mqtt.MQTT_ERR_SUCCESS:
                    rc = self._client.loop_misc()
            if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
                with self._lock:
                    self._mqtt_connected = False
        self._serve_broker()  # the last reports, and their e2e acks
        self._publish_e2e_acks()
        self._disconnect()

    def _after_crash(self) -> None:
        """Before the worker runs again: start over as after a lost MQTT connection.

        The reconnect gives a new connection number, so mids of the old one are never
        acked; the broker sends again what we did not PUBACK (the persistent session),
        and those re-sends join records still on their way to Kafka by (device, id).
        Kafka's reports of what was already produced still settle.
        """
        with self._lock:
            self._mqtt_connected = False
        self._incoming.clear()  # read but not taken: never counted, never acked, the broker re-sends them
        self._e2e_sent = []  # of the old connection: they will never show as published
        self._reconnect_at = 0.0
        self._reconnect_backoff.reset()

    def _settled(self) -> bool:
        with self._lock:
            return self._inflight + self._api_pending == 0

    def _mqtt_wait_s(self) -> float:
        """How long the loop may wait for MQTT: briefly while Kafka owes reports, else until due work."""
        if self._sink.queued() > 0 and self._sink.connected:
            return KAFKA_WAIT_S
        now = time.monotonic()
        with self._lock:
            next_retry = self._retries.due_in(now)
        return max(0.0, min(IDLE_WAIT_S, next_retry, self._acks.due_in(now)))

    def _connect_when_due(self) -> None:
        """Reconnect with exponential backoff; until it is time (or while stopping), serve Kafka."""
        now = time.monotonic()
        if self._phase != _RUNNING or now < self._reconnect_at:
            self._sink.poll(min(IDLE_WAIT_S, max(0.0, self._reconnect_at - now)))
            return
        if self._connect_once():
            self._reconnect_backoff.reset()
            return
        self._reconnect_at = time.monotonic() + self._reconnect_backoff.next_delay()

    def _read_batch(self, wait_s: float = IDLE_WAIT_S) -> int:
        """Wait (at most wait_s) for the socket, then read what is there (up to the in-flight room).

        Handling messages in batches takes the lock, the metrics and the wake-ups once per
        batch instead of once per message: a backlog drains at the speed of the wire.
        """
        rc = self._io(wait_s)
        limit = min(MAX_READ_BATCH, self._cfg.max_inflight - self._inflight)
        # Count messages, not calls: one loop_read() reads as many packets as we have QoS 1
        # publishes unconfirmed (the e2e acks), so counting calls let batches grow far too big.
        while rc == mqtt.MQTT_ERR_SUCCESS and 0 < len(self._incoming) < limit:
            before = len(self._incoming)
            rc = self._client.loop_read()
            if len(self._incoming) == before:
                break  # nothing more to read (or a non-PUBLISH packet): back to select
        return rc

    def _io(self, timeout: float) -> mqtt.MQTTErrorCode:
        """One pass of paho's external event loop: wait (at most timeout) for the socket, read, write, ping.

        (paho's loop() also writes a byte to a wake-up socket pair for every packet queued.)
        """
        client = self._client
        sock = client.socket()
        if sock is None:
            return mqtt.MQTT_ERR_NO_CONN
        buffered = sock.pending() if hasattr(sock, "pending") else 0  # TLS: decrypted, unread
        try:
            readable, writable, _ = select.select([sock], [sock] if client.want_write() else [], [],
                                                  0 if buffered else timeout)
        except (OSError, ValueError):  # closed under us (fileno -1)
            return mqtt.MQTT_ERR_CONN_LOST
        rc = client.loop_read() if readable or buffered else mqtt.MQTT_ERR_SUCCESS
        if rc == mqtt.MQTT_ERR_SUCCESS and (writable or client.want_write()):
            rc = client.loop_write()
        if rc == mqtt.MQTT_ERR_SUCCESS:
            rc = client.loop_misc()
        return rc

    def _connect_once(self) -> bool:
        """One connection attempt, waiting (bounded) for the CONNACK while serving Kafka."""
        try:
            self._client.reconnect()
        except (OSError, ValueError) as e:
            log.warning("MQTT connect to %s:%s failed: %s", self._cfg.mqtt.host, self._cfg.mqtt.port, e)
            return False
        deadline = time.monotonic() + 10
        while not self._mqtt_connected and time.monotonic() < deadline and self._phase == _RUNNING:
            if self._io(0.1) not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
                return False
            self._serve_broker()
        return self._mqtt_connected

    def _disconnect(self) -> None:
        """Send what is queued, wait (bounded) for the broker to take the e2e acks, then DISCONNECT.

        Reading again here matters: paho holds back our e2e acks beyond its max_inflight_messages
        until PUBACKs come in. Messages that
        arrive meanwhile are left unacked (we are stopping) and come back to the next session.
        """
        deadline = time.monotonic() + 3
        while self._mqtt_connected and time.monotonic() < deadline and (
                self._client.want_write() or any(not info.is_published() for info in self._e2e_sent)):
            if self._io(0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        if any(not info.is_published() for info in self._e2e_sent):
            log.warning("stopping before the broker took every e2e ack: those devices will send again")
        self._client.disconnect()
        self._client.loop_write()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._phase != _RUNNING:
            return  # left unacked: the broker delivers it again to the next session
        self._incoming.append((_topic_of(msg), msg.payload, msg.mid))

    def _handle_incoming(self) -> None:
        """Validate a batch of messages (outside the lock), then hand them to Kafka (under it).

        Each message is handled inside its own guard: whatever goes wrong with one
        (a bug of ours included) dead-letters that one as ``internal_error``.
        """
        if not self._incoming:
            return
        batch, self._incoming = self._incoming, []
        BRIDGE_RECEIVED.inc(len(batch))
        now = time.monotonic()
        verdicts = [(topic, payload, mid, self._classify(topic, payload)) for topic, payload, mid in batch]
        with self._lock:
            conn = self._conn
            for topic, payload, mid, verdict in verdicts:
                self._inflight += 1  # one by one: a crash half way leaves the count true
                self._take(topic, payload, verdict, (conn, mid), now)
            BRIDGE_INFLIGHT.set(self._inflight)

    def _classify(self, topic: str, payload: bytes) -> Accepted | Rejected:
        try:
            return classify(topic, payload, self._cfg)
        except Exception as e:  # noqa: BLE001 - this message alone pays for it, the loop goes on
            log.exception("internal error classifying a message: dead-lettered", extra={"topic": topic})
            return Rejected("internal_error", f"{type(e).__name__}: {e}", None, None)

    def _take(self, topic: str, payload: bytes, verdict: Accepted | Rejected, tag: MessageTag,
              now: float) -> None:
        """Hand one classified message to Kafka: its record, or its dead letter. Lock held."""
        try:
            if isinstance(verdict, Rejected):
                self._send(self._dead_letter_of(topic, payload, verdict, tag, now))
            else:
                self._forward(topic, verdict, tag, now)
        except Exception as e:  # noqa: BLE001 - as in _classify
            log.exception("internal error forwarding a message: dead-lettered", extra={"topic": topic})
            device = verdict.device if isinstance(verdict, Accepted) else None
            if isinstance(verdict, Accepted):
                self._unregister((verdict.device, verdict.envelope.id), tag)
            self._send(self._dead_letter_of(topic, payload, Rejected("internal_error", f"{type(e).__name__}: {e}",
                                                                     device, None), tag, now))

    def _unregister(self, key: DedupeKey, tag: MessageTag) -> None:
        """Forget the record this message registered before its handling failed: its dead letter settles it."""
        rec = self._by_id.get(key)
        if rec is not None and rec.mids == [tag]:
            del self._by_id[key]

    def _forward(self, topic: str, ok: Accepted, tag: MessageTag, now: float) -> None:
        env = ok.envelope
        key = (ok.device, env.id)
        if key in self._recent:
            BRIDGE_DUPLICATES.inc()
            self._settle_mqtt([tag], ok.device, env.seq, now)
            return
        pending = self._by_id.get(key)
        if pending is not None:  # the device sent it again before our ack reached it
            BRIDGE_DUPLICATES.inc()
            pending.mids.append(tag)
            return
        # The value is the envelope as validated, re-serialised: with a key given twice in the
        # payload (a second, spoofed device_id), consumers would not all read the one we checked.
        rec = Record(topic=ok.kafka_topic, key=env.kafka_key.encode(), value=encode(env), headers=env.kafka_headers(),
                     source=topic, received=now, mids=[tag], device=ok.device, seq=env.seq, dedupe_key=key)
        self._by_id[key] = rec  # before sending: a refusal in _send dead-letters it and unregisters it
        self._send(rec)

    def _dead_letter_of(self, topic: str, payload: bytes, bad: Rejected, tag: MessageTag,
                        now: float) -> Record:
        headers = dlq_headers(bad.reason, bad.error, topic, 0, utc_now_iso())
        if bad.reason == "too_large":
            headers.append((DLQ_ORIGINAL_BYTES, str(len(payload)).encode()))
            payload = payload[:TOO_LARGE_KEEP_BYTES]
        # One line per dead letter; topic, device and error are the sender's and are clipped.
        log.warning("dead letter: %s: %s", bad.reason, logs.clip(bad.error),
                    extra={"topic": topic, "device_id": bad.device})
        return Record(topic=self._cfg.dlq.topic, key=bad.device.encode() if bad.device else None, value=payload,
                      headers=headers, source=topic, received=now, mids=[tag], device=bad.device, seq=bad.seq,
                      dead=bad.reason)

    def _settle_mqtt(self, tags: list[MessageTag], device: str | None, seq: int | None, now: float) -> None:
        """PUBACK the messages (those of the current connection) and queue the e2e ack. Lock held."""
        for conn, mid in tags:
            if conn == self._conn:  # older mids: the broker re-sends those, and we ack the re-sends
                self._client.ack(mid, 1)
        self._inflight -= len(tags)
        if device is not None and seq is not None:
            self._acks.add(device, seq, now)

    # --- the central broker's side (sink.py: Kafka or RabbitMQ) --------------------------------

    def _send(self, rec: Record) -> None:
        """Hand a record to the broker's sink; its report comes back through ``_on_delivery``. Lock held."""
        self._sink.send(rec.topic, rec.key, rec.value, rec.headers, partial(self._on_delivery, rec))

    def _schedule(self, rec: Record, delay: float) -> None:
        self._retries.schedule(rec, time.monotonic() + delay)

    def _on_delivery(self, rec: Record, err: SendError | None, where: Delivered | None) -> None:
        self._reports.append((rec, err, where))  # handled in a batch once poll() returns

    def _handle_reports(self) -> None:
        if not self._reports:
            return
        reports, self._reports = self._reports, []
        now = time.monotonic()
        produced: dict[str, int] = {}
        with self._lock:
            for rec, err, where in reports:
                try:
                    if err is None:
                        self._confirmed(rec, where, now, produced)
                    else:
                        self._failed(rec, err)
                except Exception:  # noqa: BLE001 - a bug of ours must not drop the other reports of the batch
                    log.exception("internal error settling a delivery report", extra={"topic": rec.topic})
                    self._abandon(rec)
            BRIDGE_INFLIGHT.set(self._inflight)
        for topic, count in produced.items():
            BRIDGE_PRODUCED.labels(topic).inc(count)

    def _abandon(self, rec: Record) -> None:
        """Give up a record whose report we failed to handle: the next send of it goes through afresh.

        Its messages stay un-PUBACKed (the broker re-sends them after a reconnect, the device
        after its ack timeout); a duplicate in Kafka is allowed, a seq never acked is not. Lock held.
        """
        if rec.dedupe_key is not None and self._by_id.get(rec.dedupe_key) is rec:
            del self._by_id[rec.dedupe_key]
        self._inflight -= len(rec.mids)
        rec.mids = []

    def _confirmed(self, rec: Record, where: Delivered | None, now: float, produced: dict[str, int]) -> None:
        if rec.dead is None:
            produced[rec.topic] = produced.get(rec.topic, 0) + 1
            BRIDGE_DELIVERY_SECONDS.observe(now - rec.received)
            if rec.dedupe_key is not None:
                self._by_id.pop(rec.dedupe_key, None)
                self._recent.add(rec.dedupe_key)
        else:
            BRIDGE_DLQ.labels(rec.dead).inc()
        if rec.future is not None:
            self._api_pending -= 1
            if rec.dead is None:
                rec.future.set_result(where.as_dict() if where else {"topic": rec.topic})
            else:
                rec.future.set_exception(rec.dead_lettered())
        self._settle_mqtt(rec.mids, rec.device, rec.seq, now)

    def _failed(self, rec: Record, err: SendError) -> None:
        """A delivery failed: send again, back off, or dead-letter. Lock held."""
        BRIDGE_RETRIES.labels(rec.topic).inc()
        plan = plan_after_failure(err, rec.attempts, rec.dead is not None, self._cfg.retry)
        if plan.counts:
            rec.attempts += 1
            rec.first_failed_at = rec.first_failed_at or utc_now_iso()
        if plan.action == "dead_letter":
            self._to_dlq(rec, plan.reason, err.text)
            return
        if not plan.counts:
            self._log_outage(f"record to {rec.topic} not delivered ({err.text}); sending again")
        elif rec.dead is not None:
            log.error("dead letter to %s refused (%s), attempt %d", rec.topic, err.text, rec.attempts)
        self._schedule(rec, plan.delay)

    def _to_dlq(self, rec: Record, reason: str, error: str) -> None:
        log.warning("dead letter: %s after %d attempts: %s", reason, rec.attempts, logs.clip(error),
                    extra={"topic": rec.topic, "seq": rec.seq, "device_id": rec.device})
        if rec.dedupe_key is not None:
            self._by_id.pop(rec.dedupe_key, None)
        rec.headers = rec.headers + dlq_headers(reason, error, rec.source, rec.attempts,
                                                rec.first_failed_at or utc_now_iso())
        rec.dead = reason
        rec.topic = self._cfg.dlq.topic
        self._send(rec)

    def _log_outage(self, text: str) -> None:
        """At most one outage line every 5 s: an outage is thousands of identical failures."""
        now = time.monotonic()
        if now - self._outage_logged_at >= 5:
            self._outage_logged_at = now
            log.warning(text)

    def _serve_broker(self) -> None:
        """Everything the loop owes Kafka: reports, due retries, due e2e acks, the stall watchdog."""
        self._sink.poll(0)
        self._handle_reports()
        self._resend_due()
        if self._acks.due_in(time.monotonic()) == 0:
            self._publish_e2e_acks()
        self._watch_for_stall()

    def _resend_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            while (rec := self._retries.pop_due(now)) is not None:
                self._send(rec)

    def _publish_e2e_acks(self) -> None:
        with self._lock:
            batch = self._acks.take()
        # Kept until the broker confirms them, so that stop() can wait for the last ones.
        self._e2e_sent = [info for info in self._e2e_sent if not info.is_published()]
        for device, ranges in batch.items():
            self._e2e_sent.append(self._client.publish(ack_topic(self._cfg.mqtt.topic_prefix, device),
                                                       encode_ack(ranges), qos=1))

    def _watch_for_stall(self) -> None:
        """The sink's look after its connection (Kafka: a stalled producer is replaced, its purged
        records come back as reports and go to the new one at once)."""
        self._sink.maintain(time.monotonic())
        self._handle_reports()
        self._broker_up.set(1 if self._sink.connected and not self._sink.blocked else 0)


def _topic_of(msg: mqtt.MQTTMessage) -> str:
    try:
        return msg.topic
    except UnicodeDecodeError:  # brokers refuse such topics; an unmapped_topic dead letter if one comes
        return "<topic not UTF-8>"
