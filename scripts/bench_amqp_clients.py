#!/usr/bin/env python3
"""Which AMQP 0-9-1 client for the bridge's RabbitMQ sink: throughput with publisher confirms.

Each client publishes the same persistent, mandatory JSON messages (about 400 bytes) to a durable
topic exchange bound to a durable queue, with publisher confirms, on a private RabbitMQ node
(``EDGE_TEST_AMQP`` is not used: the queues are purged). Clients that wait for each confirm
(pika's BlockingConnection, amqpstorm) are measured on fewer messages. msg/s counts until the
last confirm; CPU is this process's per message. aio-pika and amqpstorm are measured when
installed (``pip install aio-pika amqpstorm``; not project dependencies).

Usage: .venv/bin/python scripts/bench_amqp_clients.py [--n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

from edge_testkit.rabbitmq import RabbitNode

HOST = "127.0.0.1"
PORT = 5672
N = 20000
WINDOW = 1000  # confirms outstanding at most, for the clients that pipeline
BODY = json.dumps({"id": str(uuid.uuid4()), "device_id": "gw-1", "camera_id": "cam-1", "seq": 1,
                   "type": "counting.crossing", "ts": "2026-12-04T13:00:00Z",
                   "data": {"line": "door", "direction": "in", "class": "person", "pad": "y" * 200}}).encode()


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def declare_with_pika(ch, exchange: str, queue: str) -> None:
    ch.exchange_declare(exchange, "topic", durable=True)
    ch.queue_declare(queue, durable=True)
    ch.queue_bind(queue, exchange, "#")
    ch.queue_purge(queue)


def pika_properties():
    import pika

    return pika.BasicProperties(content_type="application/json", delivery_mode=2, headers={"device-id": "gw-1"})


def bench_pika_blocking() -> tuple[float, float]:
    """BlockingConnection with confirms: each basic_publish waits for its confirm."""
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters(HOST, PORT))
    ch = conn.channel()
    declare_with_pika(ch, "b.ex", "b.q")
    ch.confirm_delivery()
    props, n = pika_properties(), min(N, 3000)
    t, c0 = time.perf_counter(), cpu_s()
    for _ in range(n):
        ch.basic_publish("b.ex", "gw-1.cam-1", BODY, props, mandatory=True)
    dt, cpu = time.perf_counter() - t, cpu_s() - c0
    conn.close()
    return n / dt, cpu / n * 1e6


def bench_pika_select() -> tuple[float, float]:
    """SelectConnection: publishes pipelined up to WINDOW unconfirmed, confirms handled as they come."""
    import pika
    from pika.adapters.select_connection import SelectConnection

    state = {"sent": 0, "acked": 0}
    props = pika_properties()

    def on_open(conn) -> None:
        conn.channel(on_open_callback=on_channel)

    def on_channel(ch) -> None:
        state["ch"] = ch
        steps = [lambda cb: ch.exchange_declare("s.ex", "topic", durable=True, callback=cb),
                 lambda cb: ch.queue_declare("s.q", durable=True, callback=cb),
                 lambda cb: ch.queue_bind("s.q", "s.ex", "#", callback=cb),
                 lambda cb: ch.queue_purge("s.q", callback=cb),
                 lambda cb: ch.confirm_delivery(on_confirm, callback=cb)]

        def run(i: int) -> None:
            if i < len(steps):
                steps[i](lambda _frame: run(i + 1))
            else:
                state["t"], state["c0"] = time.perf_counter(), cpu_s()
                pump()
        run(0)

    def pump() -> None:
        while state["sent"] < N and state["sent"] - state["acked"] < WINDOW:
            state["ch"].basic_publish("s.ex", "gw-1.cam-1", BODY, props, mandatory=True)
            state["sent"] += 1

    def on_confirm(frame) -> None:
        m = frame.method
        state["acked"] = m.delivery_tag if m.multiple else state["acked"] + 1
        if state["acked"] >= N:
            state["dt"], state["cpu"] = time.perf_counter() - state["t"], cpu_s() - state["c0"]
            conn.close()
        else:
            pump()

    conn = SelectConnection(pika.ConnectionParameters(HOST, PORT), on_open_callback=on_open,
                            on_close_callback=lambda *_: conn.ioloop.stop())
    conn.ioloop.start()
    return N / state["dt"], state["cpu"] / N * 1e6


def bench_aio_pika() -> tuple[float, float]:
    """aio-pika with publisher confirms: up to WINDOW publishes awaiting their confirm at once."""
    import aio_pika

    async def run() -> tuple[float, float]:
        conn = await aio_pika.connect(f"amqp://guest:guest@{HOST}:{PORT}/")
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.declare_exchange("a.ex", aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue("a.q", durable=True)
        await q.bind(ex, "#")
        await q.purge()
        window = asyncio.Semaphore(WINDOW)

        async def one() -> None:
            async with window:
                msg = aio_pika.Message(BODY, content_type="application/json", delivery_mode=2,
                                       headers={"device-id": "gw-1"})
                await ex.publish(msg, "gw-1.cam-1", mandatory=True)
        t, c0 = time.perf_counter(), cpu_s()
        await asyncio.gather(*(one() for _ in range(N)))
        dt, cpu = time.perf_counter() - t, cpu_s() - c0
        await conn.close()
        return N / dt, cpu / N * 1e6
    return asyncio.run(run())


def bench_amqpstorm() -> tuple[float, float]:
    """amqpstorm with confirm_deliveries: each publish waits for its confirm."""
    import amqpstorm

    conn = amqpstorm.Connection(HOST, "guest", "guest", port=PORT)
    ch = conn.channel()
    ch.exchange.declare("m.ex", "topic", durable=True)
    ch.queue.declare("m.q", durable=True)
    ch.queue.bind("m.q", "m.ex", "#")
    ch.queue.purge("m.q")
    ch.confirm_deliveries()
    n = min(N, 1000)
    t, c0 = time.perf_counter(), cpu_s()
    for _ in range(n):
        msg = amqpstorm.Message.create(ch, BODY, {"content_type": "application/json", "delivery_mode": 2,
                                                  "headers": {"device-id": "gw-1"}})
        msg.publish("gw-1.cam-1", "m.ex", mandatory=True)
    dt, cpu = time.perf_counter() - t, cpu_s() - c0
    conn.close()
    return n / dt, cpu / n * 1e6


FUNCS = {"pika_blocking": bench_pika_blocking, "pika_select": bench_pika_select, "aio_pika": bench_aio_pika,
         "amqpstorm": bench_amqpstorm}

CLIENTS = {"pika_blocking": "pika", "pika_select": "pika", "aio_pika": "aio_pika", "amqpstorm": "amqpstorm"}


def main() -> int:
    global PORT, N
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=N)
    args = ap.parse_args()
    N = args.n
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-amqp-") as tmp:
        node = RabbitNode(Path(tmp)).start()
        PORT = node.port
        try:
            for name, module in CLIENTS.items():
                if importlib.util.find_spec(module) is None:
                    results[name] = {"skipped": f"{module} not installed"}
                    continue
                rate, us = FUNCS[name]()
                results[name] = {"msg_s": round(rate), "cpu_us_per_msg": round(us, 1)}
                print(name, results[name], file=sys.stderr, flush=True)
        finally:
            node.stop()
    print(json.dumps({"n": N, "clients": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
