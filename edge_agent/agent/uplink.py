"""The uplink: drains the outbox to MQTT and deletes entries only on the bridge's end-to-end ack.

One thread owns the paho client and runs its network loop by hand, so that connecting
(with exponential backoff and jitter), publishing, reading acks and resending after the ack
timeout all happen in one place, in order. Other threads only call ``publish_direct``
(command results), which paho makes thread safe.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.agent.config import AgentMqttConfig
from edge_agent.agent.outbox import Outbox, OutboxBusy
from edge_agent.common import metrics
from edge_agent.common.backoff import Backoff, backoff_delay
from edge_agent.common.envelope import utc_now_iso
from edge_agent.common.logs import clip
from edge_agent.common.mqtt import configure_transport
from edge_agent.common.supervised import SupervisedThread
from edge_agent.common.wire import (
    ack_topic,
    command_base,
    parse_ack,
    status_topic,
    uplink_topic,
)

log = logging.getLogger(__name__)

CommandHandler = Callable[[str, bytes, "Properties | None"], None]
# Publishes awaiting the broker's PUBACK. paho walks its whole outgoing queue on every PUBACK,
# so we hand it no more than this at a time (the end-to-end window is separate and larger).
_PUBACK_WINDOW = 200
# MQTT v5's largest packet (the Remaining Length limit): what a broker that names no
# Maximum Packet Size in its CONNACK accepts.
MQTT_MAX_PACKET_SIZE = 268_435_455


@dataclass
class _InFlight:
    stream: str
    sent_at: float
    attempts: int


class Uplink:
    def __init__(self, cfg: AgentMqttConfig, device_id: str, outbox: Outbox):
        self.cfg = cfg
        self.device_id = device_id
        self.outbox = outbox
        self.topic_ack = ack_topic(cfg.topic_prefix, device_id)
        self.topic_status = status_topic(cfg.topic_prefix, device_id)
        self.topic_cmd = command_base(cfg.topic_prefix, device_id) + "#"
        # Full jitter, so that a fleet coming back after an outage does not reconnect in lockstep.
        self._reconnect = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s, jitter="full")
        self._command_handler: CommandHandler | None = None
        self._inflight: dict[int, _InFlight] = {}
        self._mid_to_seq: dict[int, int] = {}
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._tokens = 0.0
        self._token_at = time.monotonic()
        self._last_resend_scan = 0.0
        self._resend_requested = threading.Event()  # flush_outbox: resend every unacked entry now
        self.last_error: str | None = None
        self.refused_total = 0
        self._max_packet_size = MQTT_MAX_PACKET_SIZE
        self._client = self._new_client()
        # A crash (a bug of ours, a library surprise) restarts the loop with a fresh client.
        self.thread = SupervisedThread("uplink", self._run, on_restart=self._reset_after_crash)

    # --- public -----------------------------------------------------------------------

    def set_command_handler(self, handler: CommandHandler) -> None:
        self._command_handler = handler

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the offline status, disconnect and stop the thread."""
        self._stop.set()
        self.thread.stop_restarting()
        self.thread.join(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish_direct(self, topic: str, payload: bytes, *, qos: int = 1,
                       correlation_data: bytes | None = None) -> None:
        """Publish outside the outbox (command results): best effort, no end-to-end ack."""
        props = None
        if correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation_data
        self._client.publish(topic, payload, qos=qos, properties=props)

    def max_packet_size(self) -> int:
        """The largest MQTT packet the broker takes: its CONNACK's Maximum Packet Size, else MQTT's limit."""
        return self._max_packet_size

    def resend_now(self) -> None:
        """Send every unacked entry again at the next loop turn, ignoring the ack-timeout backoff."""
        self._resend_requested.set()

    def status(self) -> dict:
        return {"connected": self.connected, "host": self.cfg.host, "port": self.cfg.port,
                "inflight": len(self._inflight), "refused_total": self.refused_total,
                "last_error": self.last_error, "thread": self.thread.report()}

    # --- the client -------------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=self.cfg.client_id or f"edge-agent-{self.device_id}",
                             protocol=mqtt.MQTTv5)
        configure_transport(client, self.cfg)
        client.will_set(self.topic_status, json.dumps({"state": "offline", "device_id": self.device_id}),
                        qos=1, retain=True)
        client.max_inflight_messages_set(_PUBACK_WINDOW)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _connect_props(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s  # persistent: acks and commands wait for us
        return props

    def _on_connect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"connect refused: {reason_code}"
            log.error("MQTT connect refused: %s", reason_code)
            return
        self._max_packet_size = getattr(properties, "MaximumPacketSize", None) or MQTT_MAX_PACKET_SIZE
        client.subscribe(self.topic_ack, qos=1)
        if self._command_handler is not None:
            client.subscribe(self.topic_cmd, qos=1)
        client.publish(self.topic_status, json.dumps(
            {"state": "online", "device_id": self.device_id, "ts": utc_now_iso()}),
            qos=1, retain=True)
        self.last_error = None
        self._connected.set()
        metrics.MQTT_CONNECTED.set(1)
        log.info("MQTT connected to %s:%s (session present: %s)", self.cfg.host, self.cfg.port,
                 flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        metrics.MQTT_CONNECTED.set(0)
        if was:
            log.warning("MQTT disconnected: %s", reason_code)

    def _on_publish(self, client, userdata, mid: int, reason_code: ReasonCode, properties) -> None:
        seq = self._mid_to_seq.pop(mid, None)
        if seq is None or not reason_code.is_failure:
            return
        # The broker refused it (e.g. ACL): keep the entry, it is sent again after the ack timeout.
        entry = self._inflight.get(seq)
        stream = entry.stream if entry else "?"
        self.refused_total += 1
        metrics.PUBLISH_REFUSED.labels(stream=stream, reason=str(reason_code)).inc()
        log.error("broker refused publish of seq %s to %s: %s (entry kept)", seq, self._topic_up(stream),
                  reason_code, extra={"seq": seq, "stream": stream})

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topic_ack:
            try:
                self._handle_ack(msg.payload)
            except Exception:  # noqa: BLE001 - one odd ack must not stop the uplink
                log.exception("ack handling failed (payload %s)", clip(msg.payload))
        elif self._command_handler is not None and msg.topic.startswith(self.topic_cmd[:-1]):
            try:
                self._command_handler(msg.topic, msg.payload, getattr(msg, "properties", None))
            except Exception:  # noqa: BLE001 - a command must never stop the uplink
                log.exception("command handler failed for %s", msg.topic)

    def _handle_ack(self, payload: bytes) -> None:
        try:
            ranges = parse_ack(payload)
        except (ValueError, TypeError) as e:
            log.warning("malformed ack ignored: %s", clip(str(e)))
            return
        seqs: list[int] = []
        for lo, hi in ranges:
            if hi - lo < 4 * len(self._inflight) + 1024:
                seqs.extend(range(lo, hi + 1))
            else:  # a wide range: look only at what we hold
                seqs.extend(s for s in list(self._inflight) if lo <= s <= hi)
        for s in seqs:
            self._inflight.pop(s, None)
        self.outbox.ack(seqs)

    # --- the loop ---------------------------------------------------------------------

    def _reset_after_crash(self) -> None:
        """Before the supervisor runs ``_run`` again: in-flight entries go back, a fresh client."""
        old = self._client
        self._requeue_inflight()
        self._client = self._new_client()
        try:
            old.disconnect()  # the broker may still hold the old connection; our client id takes it over anyway
        except Exception:  # noqa: BLE001 - the old client is half broken by definition
            pass

    def _run(self) -> None:
        try:
            self._connect_and_serve()
        finally:  # also after a crash: nobody runs this client's loop now, so it is not "connected"
            self._connected.clear()
            metrics.MQTT_CONNECTED.set(0)

    def _connect_and_serve(self) -> None:
        self._reconnect.reset()
        while not self._stop.is_set():
            if not self._try_connect():
                self._stop.wait(self._reconnect.next_delay())
                continue
            self._reconnect.reset()
            self._serve_connection()
            if not self._stop.is_set():
                # A fresh client: paho would otherwise resend its own queue on top of our requeue.
                self._client = self._new_client()
        self._say_offline()

    def _try_connect(self) -> bool:
        try:
            self._client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s,
                                 clean_start=False, properties=self._connect_props())
        except (OSError, ssl.SSLError, ValueError) as e:
            self.last_error = f"connect: {e}"
            log.debug("MQTT connect to %s:%s failed: %s", self.cfg.host, self.cfg.port, e)
            return False
        deadline = time.monotonic() + 10
        while not self._connected.is_set() and time.monotonic() < deadline and not self._stop.is_set():
            rc = self._client.loop(timeout=0.1)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return False
        return self._connected.is_set()

    def _serve_connection(self) -> None:
        # After a reconnect, whatever was in flight is sent again at once rather than after a timeout.
        self._requeue_inflight()
        while not self._stop.is_set():
            rc = self._client.loop(timeout=0.005 if self.outbox.unsent_count() else 0.05)
            if rc != mqtt.MQTT_ERR_SUCCESS or not self._connected.is_set():
                self._connected.clear()
                metrics.MQTT_CONNECTED.set(0)
                try:
                    self._client.disconnect()
                except Exception:  # noqa: BLE001
                    pass
                return
            self._send_new()
            self._resend_overdue()

    def _requeue_inflight(self) -> None:
        # The outbox's own in-flight set: it also holds entries a crash left between take and publish.
        self.outbox.requeue_inflight()
        self._inflight.clear()
        self._mid_to_seq.clear()

    def _budget(self) -> int:
        room = min(self.cfg.max_inflight - len(self._inflight), _PUBACK_WINDOW - len(self._mid_to_seq))
        if self.cfg.drain_rate <= 0:
            return room
        now = time.monotonic()
        self._tokens = min(self._tokens + (now - self._token_at) * self.cfg.drain_rate,
                           max(self.cfg.drain_rate / 20, 1.0))
        self._token_at = now
        return min(room, int(self._tokens))

    def _send_new(self) -> None:
        budget = self._budget()
        if budget <= 0:
            return
        entries = self.outbox.take_unsent(budget)
        now = time.monotonic()
        for e in entries:
            info = self._client.publish(self._topic_up(e.stream), e.payload, qos=1)
            self._mid_to_seq[info.mid] = e.seq
            self._inflight[e.seq] = _InFlight(e.stream, now, 1)
            metrics.PUBLISHED.labels(stream=e.stream).inc()
        self._tokens -= len(entries)

    def _topic_up(self, stream: str) -> str:
        return uplink_topic(self.cfg.topic_prefix, self.device_id, stream)

    def _ack_timeout(self, attempts: int) -> float:
        """How long the ``attempts``-th send may wait for its ack: the backoff, give or take a fifth,
        so that entries sent together are not all resent in the same turn."""
        return backoff_delay(attempts, self.cfg.ack_timeout_s, self.cfg.ack_timeout_max_s) * random.uniform(0.8, 1.2)

    def _resend_overdue(self) -> None:
        now = time.monotonic()
        forced = self._resend_requested.is_set()
        if forced:
            self._resend_requested.clear()
        elif now - self._last_resend_scan < 0.25:
            return
        self._last_resend_scan = now
        for seq, f in list(self._inflight.items()):
            if not forced and now - f.sent_at < self._ack_timeout(f.attempts):
                continue
            try:
                entry = self.outbox.get(seq)
            except OutboxBusy:  # a transient read error: this entry waits for the next scan
                continue
            if entry is None:  # acked, dropped or unreadable meanwhile
                self._inflight.pop(seq, None)
                continue
            info = self._client.publish(self._topic_up(entry.stream), entry.payload, qos=1)
            self._mid_to_seq[info.mid] = seq
            f.sent_at, f.attempts = now, f.attempts + 1
            metrics.RESENT.inc()

    def _say_offline(self) -> None:
        if not self._connected.is_set():
            return
        info = self._client.publish(self.topic_status, json.dumps(
            {"state": "offline", "device_id": self.device_id, "ts": utc_now_iso(), "reason": "shutdown"}),
            qos=1, retain=True)
        deadline = time.monotonic() + 2
        while not info.is_published() and time.monotonic() < deadline:
            self._client.loop(timeout=0.05)
        self._client.disconnect()
        self._client.loop(timeout=0.1)
        self._connected.clear()
        metrics.MQTT_CONNECTED.set(0)
