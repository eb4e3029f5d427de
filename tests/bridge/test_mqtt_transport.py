"""The bridge's paho client: reads from a buffer, loops without paho's socket pair."""

from __future__ import annotations

import socket
import uuid
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.bridge.mqtt_transport import (
    BufferedClient,
    BufferedSocket,
    decode_plain_qos1_publish,
)
from edge_testkit.processes import wait_for


@pytest.fixture
def pair() -> Iterator[tuple[BufferedSocket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)  # a test that expects bytes that never come fails instead of hanging
    yield BufferedSocket(ours, chunk=16), theirs
    ours.close()
    theirs.close()


def test_small_reads_are_served_from_one_chunk(pair: tuple[BufferedSocket, socket.socket]) -> None:
    sock, peer = pair
    peer.sendall(b"\x30\x05hello\x30\x02hi")
    assert sock.recv(1) == b"\x30"
    assert sock.pending() == 10  # the rest of the 11 bytes waits in our buffer, not in the kernel
    assert sock.recv(1) == b"\x05"
    assert sock.recv(5) == b"hello"
    assert sock.recv(1) == b"\x30"
    assert sock.recv(100) == b"\x02hi"  # a short read: what is buffered, no second system call
    assert sock.pending() == 0


def test_a_read_larger_than_the_buffer_gets_what_arrived(pair: tuple[BufferedSocket, socket.socket]) -> None:
    sock, peer = pair
    body = bytes(range(256)) * 4
    peer.sendall(body)
    got = b""
    while len(got) < len(body):
        got += sock.recv(len(body) - len(got))
    assert got == body


def test_nothing_to_read_raises_like_a_socket_and_a_closed_peer_reads_empty(
        pair: tuple[BufferedSocket, socket.socket]) -> None:
    sock, peer = pair
    with pytest.raises(BlockingIOError):
        sock.recv(1)
    peer.sendall(b"ab")
    peer.shutdown(socket.SHUT_WR)
    assert sock.recv(1) == b"a"
    assert sock.recv(1) == b"b"
    assert sock.recv(1) == b""  # paho reads this as "connection lost"


def test_other_socket_methods_reach_the_socket(pair: tuple[BufferedSocket, socket.socket]) -> None:
    sock, peer = pair
    assert sock.send(b"x") == 1
    sock.flush()
    assert peer.recv(1) == b"x"
    assert sock.getsockname() == sock._sock.getsockname()  # via __getattr__
    assert sock.fileno() >= 0


def test_a_burst_of_messages_large_and_small_arrives_whole_over_mosquitto(mqtt_broker: Any) -> None:
    """Packets split across 64 KiB reads (a 200 KiB one too) are reassembled, and PUBACKs go out
    (collected, without the socket pair): with a receive maximum of 10, the broker sends the
    next message only once our PUBACKs arrive."""
    topic = f"t/{uuid.uuid4().hex[:8]}"
    sizes = [10, 70_000, 3, 200_000] + [400] * 500
    got: list[bytes] = []
    sub = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id=f"buf-{uuid.uuid4().hex[:6]}",
                         protocol=mqtt.MQTTv5, manual_ack=True)
    sub.on_message = lambda c, _u, msg: (got.append(msg.payload), c.ack(msg.mid, msg.qos))
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = 10
    sub.connect(mqtt_broker.host, mqtt_broker.port, properties=props)
    subscribed: list[bool] = []
    sub.on_subscribe = lambda *_: subscribed.append(True)
    sub.subscribe(topic, options=SubscribeOptions(qos=1))
    wait_for(lambda: sub.loop(0.05) == mqtt.MQTT_ERR_SUCCESS and subscribed, 10, interval=0)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(mqtt_broker.host, mqtt_broker.port)
    pub.loop_start()
    try:
        for i, size in enumerate(sizes):
            pub.publish(topic, (str(i).encode() + b":").ljust(size, b"x"), qos=1)
        wait_for(lambda: sub.loop(0.05) == mqtt.MQTT_ERR_SUCCESS and len(got) >= len(sizes), 30, interval=0,
                 message=lambda: f"{len(sizes)} messages (have {len(got)})")
        assert [len(p) for p in got] == [max(size, len(str(i)) + 1) for i, size in enumerate(sizes)]
        assert [int(p.split(b":")[0]) for p in got] == list(range(len(sizes)))
        assert sub._sockpairW is None  # no byte per queued PUBACK
        wait_for(lambda: sub.loop(0.05) == mqtt.MQTT_ERR_SUCCESS and not sub.want_write(), 10, interval=0,
                 message="every PUBACK written")
    finally:
        pub.disconnect()
        pub.loop_stop()
        sub.disconnect()


def test_writes_are_collected_until_flush_and_a_full_kernel_buffer_keeps_the_rest(
        pair: tuple[BufferedSocket, socket.socket]) -> None:
    sock, peer = pair
    peer.setblocking(False)
    assert sock.send(b"\x40\x02\x00\x01") == 4  # a PUBACK ...
    assert sock.send(b"\x40\x02\x00\x02") == 4  # ... and another: nothing written yet
    with pytest.raises(BlockingIOError):
        peer.recv(100)
    sock.flush()
    assert peer.recv(100) == b"\x40\x02\x00\x01\x40\x02\x00\x02"
    big = b"x" * 8_000_000  # more than a socket pair's buffers hold
    sock.send(big)
    with pytest.raises(BlockingIOError):
        sock.flush()
    assert 0 < sock.unsent() < len(big)
    got = bytearray()
    while len(got) < len(big):
        try:
            got += peer.recv(1 << 20)
        except BlockingIOError:
            try:
                sock.flush()
            except BlockingIOError:
                pass
    assert bytes(got) == big and sock.unsent() == 0


def test_close_writes_what_was_collected(pair: tuple[BufferedSocket, socket.socket]) -> None:
    sock, peer = pair
    sock.send(b"\xe0\x00")  # DISCONNECT: paho closes the socket right after handing it over
    sock.close()
    assert peer.recv(10) == b"\xe0\x00"


def _publish_packet(topic: bytes, mid: int, payload: bytes, properties: bytes = b"\x00") -> bytes:
    """A PUBLISH without its fixed header, as paho hands it to the decoder."""
    return len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big") + properties + payload


@pytest.mark.parametrize("header", [0x32, 0x3A, 0x33])  # QoS 1; with dup; with retain
def test_the_plain_qos1_decoder_agrees_with_paho(header: int) -> None:
    from paho.mqtt._packet import decode_publish

    packet = _publish_packet(b"edge/gw-1/up/camera.events", 513, b'{"v":1}')
    ours = decode_plain_qos1_publish(header, packet, mqtt.MQTTv5)
    paho = decode_publish(header, packet, mqtt.MQTTv5)
    assert ours is not None
    assert (ours.topic, ours.mid, ours.payload, ours.qos, ours.dup, ours.retain) == (
        paho.topic.decode(), paho.mid, paho.payload, paho.qos, paho.dup, paho.retain)


@pytest.mark.parametrize("header, packet, protocol", [
    (0x30, b"\x00\x01t" + b"\x00" + b"payload", mqtt.MQTTv5),  # QoS 0: no packet id
    (0x34, _publish_packet(b"t", 1, b"p"), mqtt.MQTTv5),  # QoS 2
    (0x32, _publish_packet(b"t", 1, b"p", properties=b"\x03\x23\x00\x01"), mqtt.MQTTv5),  # a topic alias
    (0x32, b"\x00\x01t\x00\x01p", mqtt.MQTTv311),  # MQTT 3.1.1: no property length at all
    (0x32, b"\x00\x09t\x00", mqtt.MQTTv5),  # truncated
])
def test_anything_else_is_left_to_paho(header: int, packet: bytes, protocol: int) -> None:
    assert decode_plain_qos1_publish(header, packet, protocol) is None
