"""A paho client that reads and writes its socket in large chunks (the bridge's MQTT side).

paho reads each packet with at least three ``recv`` calls (the command byte, every
byte of the remaining length, then the body) and writes each packet with its own
``send``: one system call each, which at thousands of messages a second was most
of the bridge's MQTT work. ``BufferedSocket`` fills a buffer with one ``recv`` of
up to 64 KiB and serves paho's small reads from it, and collects paho's writes
until ``loop_write`` has queued them all, then writes them at once.

Two hooks paho already has keep its loop right: ``pending()`` (meant for TLS
sockets: bytes received but not read yet) makes it read on without waiting in
``select``, and ``want_write()`` stays true while collected bytes are unsent.

``BufferedClient`` also decodes the common PUBLISH (QoS 1, MQTT v5, no properties)
itself: paho builds and clears a ``Properties`` object for every PUBLISH, a large
share of the bridge's CPU per message (docs/bridge.md). Any other PUBLISH is paho's.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

import paho.mqtt.client as mqtt

CHUNK_BYTES = 64 * 1024
_TRY_AGAIN = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class BufferedSocket:
    """Wraps a connected (maybe TLS) non-blocking socket: buffered ``recv``, collected ``send``."""

    def __init__(self, sock: Any, chunk: int = CHUNK_BYTES):
        self._sock = sock
        self._chunk = chunk
        self._data = b""
        self._pos = 0
        self._out = bytearray()

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._data):
            # Errors (BlockingIOError, ssl.SSLWantReadError, OSError) reach paho unchanged;
            # b"" (peer closed) too, since the buffer is empty.
            data = self._sock.recv(max(bufsize, self._chunk))
            if len(data) <= bufsize:
                return data
            self._data, self._pos = data, 0
        end = min(self._pos + bufsize, len(self._data))
        out = self._data[self._pos:end]
        self._pos = end
        return out

    def pending(self) -> int:
        """Bytes received and not read yet: ours, plus those a TLS layer decrypted."""
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._data) - self._pos + inner

    def send(self, data: bytes) -> int:
        """Collect the bytes; ``flush`` writes them."""
        self._out += data
        return len(data)

    def flush(self) -> None:
        """Write what ``send`` collected. Raises as ``socket.send`` does; what is not written stays."""
        while self._out:
            sent = self._sock.send(self._out)
            del self._out[:sent]

    def unsent(self) -> int:
        return len(self._out)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        try:
            self.flush()  # paho closes right after it hands us its DISCONNECT packet
        except OSError:
            pass  # closing anyway: what could not go out is lost with the connection
        self._data, self._pos, self._out = b"", 0, bytearray()
        self._sock.close()

    def __getattr__(self, name: str) -> Any:  # setblocking, settimeout, getpeername, ...
        return getattr(self._sock, name)


class BufferedClient(mqtt.Client):
    """paho's Client on a BufferedSocket, for a program that makes every paho call from one thread.

    ``loop()`` is paho's select loop without paho's socket pair. paho writes a byte to that
    pair for every packet it queues (every PUBACK) to wake a loop running in another thread;
    here the loop runs in the thread that queues, and select() already waits for the socket
    to be writable whenever something is queued.
    """

    def _create_socket(self) -> Any:
        return BufferedSocket(super()._create_socket())

    def loop(self, timeout: float = 1.0) -> mqtt.MQTTErrorCode:
        return self._loop(timeout)

    def loop_write(self) -> mqtt.MQTTErrorCode:
        rc = super().loop_write()
        sock = self._sock
        if rc != mqtt.MQTT_ERR_SUCCESS or not isinstance(sock, BufferedSocket):
            return rc
        try:
            sock.flush()
        except _TRY_AGAIN:
            pass  # the kernel's buffer is full: want_write() keeps select waiting to write the rest
        except OSError:
            return self._loop_rc_handle(mqtt.MQTT_ERR_CONN_LOST)  # as paho handles a failed send
        return rc

    def want_write(self) -> bool:
        sock = self._sock
        return super().want_write() or (isinstance(sock, BufferedSocket) and sock.unsent() > 0)

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        message = decode_plain_qos1_publish(self._in_packet["command"], self._in_packet["packet"], self._protocol)
        if message is None:
            return super()._handle_publish()
        self._handle_on_message(message)
        return mqtt.MQTT_ERR_SUCCESS if self._manual_ack else self._send_puback(message.mid)


def decode_plain_qos1_publish(header: int, packet: bytes, protocol: int) -> mqtt.MQTTMessage | None:
    """A QoS 1 MQTT v5 PUBLISH with no properties as paho's MQTTMessage (``properties`` None); else None.

    ``packet`` is what follows the fixed header: topic length, topic, packet id,
    property length (0 here), payload.
    """
    if protocol != mqtt.MQTTv5 or header & 0x06 != 0x02 or len(packet) < 2:
        return None
    topic_end = 2 + int.from_bytes(packet[:2], "big")
    if len(packet) < topic_end + 3 or packet[topic_end + 2] != 0:
        return None
    message = mqtt.MQTTMessage(mid=int.from_bytes(packet[topic_end:topic_end + 2], "big"),
                               topic=bytes(packet[2:topic_end]))
    message.dup = bool(header & 0x08)
    message.qos = 1
    message.retain = bool(header & 0x01)
    message.payload = bytes(packet[topic_end + 3:])
    message.timestamp = time.monotonic()  # paho's own clock for it
    return message
