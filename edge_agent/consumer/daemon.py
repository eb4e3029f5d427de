"""``edge-agent consume -c consumer.yaml``: the consumer loop, its HTTP thread, the auditor and systemd."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from edge_agent.common import logs
from edge_agent.common.config import ConfigError, missing_secrets, print_problems
from edge_agent.common.supervised import Health, SupervisedThread
from edge_agent.common.systemd import notify, watchdog_interval_s
from edge_agent.common.wire import AUDIT_STREAM
from edge_agent.consumer.auditor import SeqAuditor, publish_audit
from edge_agent.consumer.config import ConsumerConfig, load_consumer
from edge_agent.consumer.http import make_server
from edge_agent.consumer.loop import ConsumerLoop, SinkState
from edge_agent.consumer.sink import HandlerSink, Item, Sink, load_handler

log = logging.getLogger(__name__)


def make_sink(cfg: ConsumerConfig, group: str | None = None) -> Sink:
    """The configured sink; ConfigError when its DSN variable is unset or its handler cannot be loaded."""
    if cfg.sink.postgres is not None:
        if importlib.util.find_spec("psycopg") is None:
            raise ConfigError(["sink.postgres: psycopg is not installed: pip install 'edge-agent[consumer]'"])
        from edge_agent.consumer.postgres import PostgresSink

        pg = cfg.sink.postgres
        dsn = os.environ.get(pg.dsn_env)
        if not dsn:
            raise ConfigError([f"sink.postgres.dsn_env: environment variable {pg.dsn_env} is not set"])
        return PostgresSink(dsn, group or cfg.group, pg.schema_, connect_timeout_s=pg.connect_timeout_s)
    assert cfg.sink.handler is not None
    try:
        return HandlerSink(load_handler(cfg.sink.handler))
    except (ImportError, AttributeError, TypeError) as e:
        raise ConfigError([f"sink.handler: cannot load {cfg.sink.handler}: {e}"]) from e


def auditing(cfg: ConsumerConfig, sink: Sink) -> tuple[Callable[[list[Item]], None] | None, Callable[[Any], None] | None]:
    """The auditor's feed and check for the loop (None, None when ``audit`` is off)."""
    if cfg.audit is None:
        return None, None
    confirm = None
    if cfg.sink.postgres is not None:
        from edge_agent.consumer.postgres import PostgresSink, seqs_present

        assert isinstance(sink, PostgresSink)
        confirm = lambda device, lo, hi: seqs_present(sink, device, lo, hi)  # noqa: E731
    audit = cfg.audit
    auditor = SeqAuditor(audit.reorder_timeout_s, max_devices=audit.max_devices, confirm=confirm)
    last = [time.monotonic()]

    def observe(items: list[Item]) -> None:
        for item in items:
            env = item.envelope
            auditor.observe(env.device_id, env.seq, env.type, env.data)

    def tick(producer: Any) -> None:
        if time.monotonic() - last[0] < audit.check_interval_s:
            return
        last[0] = time.monotonic()
        for loss in auditor.check():
            log.error("device %s: seqs %d..%d lost (%d), no overflow or reset explains them", loss.device,
                      loss.first, loss.last, loss.count)
            publish_audit(producer, AUDIT_STREAM, cfg.group, "audit.seq_gap",
                          {"device": loss.device, "from": loss.first, "to": loss.last, "count": loss.count,
                           "group": cfg.group, "reorder_timeout_s": audit.reorder_timeout_s})
    return observe, tick


def serve_http(cfg: ConsumerConfig, health: Health) -> Callable[[], None]:
    host, port = cfg.http.host_port
    server = make_server(host, port, health.healthz)
    part = SupervisedThread("http", server.serve_forever)
    health.add(part)
    part.start()
    log.info("HTTP on %s:%d (/healthz, /metrics)", host, port)

    def stop() -> None:
        part.stop_restarting()
        server.shutdown()
        server.server_close()
        part.join(5)
    return stop


def load_or_exit(path: Path) -> ConsumerConfig | int:
    try:
        cfg = load_consumer(path)
        problems = missing_secrets(cfg)
        if problems:
            raise ConfigError(problems)
        return cfg
    except ConfigError as e:
        return print_problems(e.problems)


def run_consume(path: Path) -> int:
    """Run the consumer group until SIGTERM/SIGINT; commit what is done, leave the group, exit 0."""
    cfg = load_or_exit(path)
    if isinstance(cfg, int):
        return cfg
    logs.setup(cfg.log.level, cfg.log.format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        sink = make_sink(cfg)
    except ConfigError as e:
        return print_problems(e.problems)
    observe, tick = auditing(cfg, sink)
    health = Health()
    state = SinkState()
    health.add(state)
    loop = ConsumerLoop(cfg, sink, stop, observe=observe, tick=tick, sink_state=state)
    part = SupervisedThread("consumer", loop.run)
    health.add(part)
    part.start()
    stop_http = serve_http(cfg, health)
    notify("READY=1")
    log.info("consuming %s as group %s", ", ".join(cfg.topics), cfg.group)
    while not stop.wait(watchdog_interval_s()):
        if not health.dead():
            notify("WATCHDOG=1")
        else:
            log.error("dead for good: %s; withholding the watchdog ping", ", ".join(health.dead()))
    notify("STOPPING=1")
    log.info("signal received: finishing the batch in hand, committing, leaving the group")
    part.stop_restarting()
    part.join(25)
    sink.close()
    stop_http()
    log.info("stopped")
    return 0
