"""No input stops the bridge, and its health tells the truth (issue 10), over the real wire.

Real Mosquitto and the Kafka-protocol test broker; a paho "device" (test_bridge_wire.Device)
sends the poison. Parts are killed from inside by making one of their methods raise.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_bridge_wire import (
    Device,
    bridge_config,
    bridge_process,
    running,
    seqs_in_kafka,
    write_config,
)

import edge_agent.bridge.worker as bridge_mod
from edge_agent.bridge.config import BridgeConfig
from edge_agent.bridge.daemon import serve_http
from edge_agent.bridge.worker import Bridge
from edge_agent.common.envelope import build, encode
from edge_testkit.processes import wait_for
from edge_testkit.records import consume_all

pytestmark = pytest.mark.timeout(180)

MAX_BYTES = 20_000


def poison_for(dev: Device) -> dict[str, tuple[str, bytes, str]]:
    """name -> (topic, payload, the dlq-reason it must get): each of these once stopped the bridge or leaked."""
    good = json.loads(encode(build(dev.device_id, 900, "camera.online", {}, camera_id="cam-1")))
    return {
        "deep list": (dev.topic(), b"[" * 3000, "invalid_json"),
        "deep object": (dev.topic(), b'{"a":' * 3000, "invalid_json"),
        "deep list, other stream": (dev.topic("anything"), b"[" * 3000, "unmapped_topic"),
        "deep object, other stream": (dev.topic("anything"), b'{"a":' * 3000 + b"1" + b"}" * 3000,
                                      "unmapped_topic"),
        "deep and too large": (dev.topic(), b"[" * 70_000, "too_large"),
        "NaN": (dev.topic(), json.dumps({**good, "seq": 901, "data": {"x": float("nan")}}).encode(), "invalid_json"),
        "Infinity": (dev.topic(), json.dumps({**good, "seq": 902, "data": {"x": float("inf")}}).encode(),
                     "invalid_json"),
        "not UTF-8": (dev.topic(), b'{"v": 1, "id": "\xff\xfe"}', "invalid_json"),
        "60 KB topic": (dev.topic("x" * 60_000), encode(build(dev.device_id, 903, "camera.online", {})),
                        "unmapped_topic"),
    }


def dlq_by_reason(kafka: Any, cfg: BridgeConfig, n: int) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for rec in consume_all(kafka, cfg.dlq.topic, expect_n=n, timeout=60):
        out.setdefault(rec.headers["dlq-reason"].decode(), []).append(rec)
    return out


def healthz(port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


@contextmanager
def with_http(bridge: Bridge) -> Iterator[int]:
    stop = serve_http(bridge)
    try:
        yield bridge.config.http.host_port[1]
    finally:
        stop()


# --- poison ------------------------------------------------------------------------------------

def test_poison_is_dead_lettered_alone_and_valid_envelopes_still_reach_kafka(
        mqtt_broker: Any, kafka: Any, device_factory: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = bridge_config(mqtt_broker, kafka, max_message_bytes=MAX_BYTES)
    # Our own bugs, one while classifying and one while forwarding: each message pays alone.
    real_classify, real_encode = bridge_mod.classify, bridge_mod.encode

    def buggy_classify(topic: str, payload: bytes, c: BridgeConfig) -> Any:
        if b"classify-bug" in payload:
            raise KeyError("a bug of ours")
        return real_classify(topic, payload, c)

    def buggy_encode(env: Any) -> bytes:
        if env.type == "forward-bug":
            raise TypeError("another bug of ours")
        return real_encode(env)

    monkeypatch.setattr(bridge_mod, "classify", buggy_classify)
    monkeypatch.setattr(bridge_mod, "encode", buggy_encode)
    with running(cfg) as bridge, with_http(bridge) as port:
        dev = device_factory(cfg)
        poison = poison_for(dev)
        for topic, payload, _reason in poison.values():
            dev.send_raw(topic, payload)
        dev.send_raw(dev.topic(), b'{"classify-bug": 1}')
        dev.send_raw(dev.topic(), encode(build("gw-1", 904, "forward-bug", {})))
        # A spoofed device_id given first and the real one last: accepted as gw-1's, forwarded
        # re-serialised so that no consumer can read the other one.
        spoof = encode(build("gw-1", 905, "camera.online", {}))
        dev.send_raw(dev.topic(), b'{"device_id": "gw-evil", ' + spoof[1:], 905)
        for seq in range(1, 51):
            dev.send(seq)
        dev.wait_acked(set(range(1, 51)) | {905}, timeout=60)
        assert healthz(port).status_code == 200
        assert bridge.health()["parts"]["bridge-worker"] == {"state": "running", "restarts": 0, "last_error": None}

    want = sorted([r for _t, _p, r in poison.values()] + ["internal_error"] * 2)
    letters = dlq_by_reason(kafka, cfg, len(want))
    assert sorted(r for r, recs in letters.items() for _ in recs) == want
    for rec in letters["unmapped_topic"]:  # the 60 KB topic is clipped in the header
        assert len(rec.headers["dlq-source-topic"]) < 1100
    assert len(letters["too_large"][0].value) == 64 * 1024
    assert {rec.headers["dlq-error"].split(b":")[0] for rec in letters["internal_error"]} == {b"KeyError",
                                                                                             b"TypeError"}
    found = seqs_in_kafka(kafka, cfg.topics["camera.events"], set(range(1, 51)) | {905})
    assert set(range(1, 51)) | {905, 903} >= found
    spoofed = [r for r in consume_all(kafka, cfg.topics["camera.events"], 51, timeout=30)
               if r.headers["seq"] == b"905"]
    assert spoofed and all(b"gw-evil" not in r.value for r in spoofed)
    assert spoofed[0].json()["device_id"] == "gw-1"
    # one line per dead letter, and no line carries the 60 KB topic or a 3,000-bracket payload
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_agent.bridge.worker"]
    assert sum(line.startswith("dead letter") for line in lines) == len(want)
    assert max(map(len, lines)) < 1000


def test_a_bridge_killed_with_poison_in_its_session_dead_letters_it_after_the_restart(
        mqtt_broker: Any, kafka: Any, device_factory: Any, agent_process: Any, tmp_path: Path) -> None:
    cfg = bridge_config(mqtt_broker, kafka, max_message_bytes=MAX_BYTES)
    path = write_config(cfg, tmp_path / "bridge.yaml")
    port = cfg.http.host_port[1]
    proc = bridge_process(agent_process, path)
    dev = device_factory(cfg)
    poison = poison_for(dev)
    for topic, payload, _reason in poison.values():
        dev.send_raw(topic, payload)
    for seq in range(1, 21):
        dev.send(seq)
    dev.wait_acked(set(range(1, 21)), timeout=60)
    assert healthz(port).status_code == 200
    proc.kill()
    # While it is down the broker keeps all of this for the bridge's persistent session.
    for topic, payload, _reason in poison.values():
        dev.send_raw(topic, payload)
    for seq in range(21, 41):
        dev.send(seq)
    dev.wait_published(30)
    bridge_process(agent_process, path)
    dev.wait_acked(set(range(1, 41)), timeout=90)  # no re-sends: the session brought them
    assert healthz(port).status_code == 200
    letters = dlq_by_reason(kafka, cfg, 2 * len(poison))
    assert sum(map(len, letters.values())) >= 2 * len(poison)
    assert set(letters) == {reason for _t, _p, reason in poison.values()}
    assert seqs_in_kafka(kafka, cfg.topics["camera.events"], set(range(1, 41))) == set(range(1, 41))


# --- the worker and the HTTP server killed from inside -------------------------------------------

def _raise_once(method: Any, when: Any = lambda: True) -> Any:
    fired: list[bool] = []

    def patched(*args: Any, **kwargs: Any) -> Any:
        if not fired and when():
            fired.append(True)
            raise RuntimeError("killed from the test")
        return method(*args, **kwargs)
    patched.fired = fired  # type: ignore[attr-defined]
    return patched


def test_a_crashed_worker_restarts_and_the_broker_brings_back_what_it_held(
        mqtt_broker: Any, kafka: Any, device_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    cfg = bridge_config(mqtt_broker, kafka)
    with running(cfg) as bridge, with_http(bridge) as port:
        dev = device_factory(cfg)
        dev.send(1)
        dev.wait_acked({1}, timeout=30)
        # Crash while a batch is read and not yet handed to Kafka: nobody PUBACKed those.
        bridge._handle_incoming = _raise_once(bridge._handle_incoming,  # type: ignore[method-assign]
                                              when=lambda: bool(bridge._incoming))
        for seq in range(2, 202):
            dev.send(seq)
        wait_for(lambda: bridge._handle_incoming.fired, 30, message="the worker crashed")  # type: ignore[attr-defined]
        # The device does not re-send: only the broker's session can bring the lost batch back.
        dev.wait_acked(set(range(1, 202)), timeout=90)
        part = bridge.health()["parts"]["bridge-worker"]
        assert (part["state"], part["restarts"]) == ("running", 1)
        assert "killed from the test" in part["last_error"]
        assert healthz(port).status_code == 200
        wait_for(lambda: bridge.health()["inflight"] == 0, 15, message="nothing left in flight")
    assert "thread bridge-worker crashed" in caplog.text and "Traceback" in caplog.text
    assert seqs_in_kafka(kafka, cfg.topics["camera.events"], set(range(1, 202))) == set(range(1, 202))


def test_a_bug_settling_one_delivery_report_spares_the_others_and_the_resend_goes_through(
        mqtt_broker: Any, kafka: Any, device_factory: Any) -> None:
    cfg = bridge_config(mqtt_broker, kafka)
    with running(cfg) as bridge:
        bridge._confirmed = _raise_once(bridge._confirmed)  # type: ignore[method-assign]
        dev = device_factory(cfg)
        for seq in range(1, 31):
            dev.send(seq)
        dev.wait_acked(set(range(1, 31)), timeout=60, resend_after_s=2.0)
        assert bridge._confirmed.fired  # type: ignore[attr-defined]
        assert bridge.health()["parts"]["bridge-worker"]["restarts"] == 0
        wait_for(lambda: bridge.health()["inflight"] == 0, 15, message="nothing left in flight")
    assert seqs_in_kafka(kafka, cfg.topics["camera.events"], set(range(1, 31))) == set(range(1, 31))


def test_a_worker_that_keeps_crashing_is_503_and_a_new_bridge_takes_over(
        mqtt_broker: Any, kafka: Any, device_factory: Any) -> None:
    cfg = bridge_config(mqtt_broker, kafka)
    bridge = Bridge(cfg, restart_backoff_s=0.05, max_restarts=2)
    bridge.start()
    try:
        wait_for(lambda: bridge.health()["mqtt"]["connected"], 15, message="bridge connected")
        with with_http(bridge) as port:
            assert healthz(port).status_code == 200
            dev = device_factory(cfg)
            dev.send(1)
            dev.wait_acked({1}, timeout=30)

            def always(*_a: Any) -> None:
                raise RuntimeError("broken for good")
            bridge._serve_broker = always  # type: ignore[method-assign]
            answer = wait_for(lambda: (r := healthz(port)).status_code == 503 and r, 30, message="healthz 503")
            body = answer.json()
            assert body["status"] == "unhealthy" and body["dead"] == ["bridge-worker"]
            assert body["parts"]["bridge-worker"]["state"] == "dead"
            assert body["parts"]["http"]["state"] == "running"
            assert not bridge.alive()  # run_bridge withholds the watchdog ping on this
            for seq in range(2, 12):
                dev.send(seq)
            dev.wait_published(15)
            assert healthz(port).status_code == 503  # stays dead: nothing restarts it any more
    finally:
        bridge.stop(timeout=2)
    # What systemd does next: a new process on the same persistent session gets the rest.
    with running(cfg) as fresh, with_http(fresh) as port:
        dev.wait_acked(set(range(1, 12)), timeout=60)
        assert healthz(port).status_code == 200


def test_a_crashed_http_server_is_restarted(mqtt_broker: Any, kafka: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    cfg = bridge_config(mqtt_broker, kafka)
    monkeypatch.setattr(uvicorn.Server, "run", _raise_once(uvicorn.Server.run))
    with running(cfg) as bridge, with_http(bridge) as port:
        assert healthz(port).status_code == 200
        part = bridge.health()["parts"]["http"]
        assert (part["state"], part["restarts"]) == ("running", 1)


# --- HTTP framing, on a raw socket ----------------------------------------------------------------

def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


@pytest.mark.parametrize("length, status", [
    (b"-1", 400), (b"abc", 400), (b"1e3", 400), (b" ", 400), (b"1, 2", 400),
    (b"300000000", 413),  # 300 MB announced, unauthenticated: refused before a byte is read
    (b"99999999999999999999999", 400),  # h11 refuses a length that long outright
])
def test_a_bad_or_huge_content_length_gets_an_answer_not_a_dropped_connection(
        mqtt_broker: Any, kafka: Any, length: bytes, status: int) -> None:
    cfg = bridge_config(mqtt_broker, kafka)
    with running(cfg) as bridge, with_http(bridge) as port:
        answer = _raw(port, b"POST /api/v1/queue/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: " + length + b"\r\n\r\n{}")
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:300]
        assert healthz(port).status_code == 200
