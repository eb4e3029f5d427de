"""A consumer handler for the tests (``sink: {handler: "flaky_handler:handle"}``, PYTHONPATH=tests/consumer).

Appends each handled envelope's data to ``$FLAKY_OUT``; an envelope with ``data.fail = k`` raises
on its first k calls (counted in files under ``$FLAKY_STATE``, so a restart keeps counting)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def handle(envelope) -> None:
    fail = envelope.data.get("fail", 0)
    if fail:
        counter = Path(os.environ["FLAKY_STATE"]) / f"calls-{envelope.id}"
        calls = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(calls + 1))
        if calls < fail:
            raise RuntimeError(f"flaky failure {calls + 1} of {fail}")
    with open(os.environ["FLAKY_OUT"], "a") as out:
        out.write(json.dumps(envelope.data) + "\n")
