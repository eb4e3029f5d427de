"""Exponential backoff, the one rule every retry loop of both daemons follows."""

from __future__ import annotations

import random
from typing import Literal

Jitter = Literal["none", "full", "equal"]


def backoff_delay(attempt: int, base_s: float, cap_s: float, *, jitter: Jitter = "none",
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before try ``attempt + 1`` (``attempt`` >= 1): ``base_s * 2**(attempt-1)``, capped.

    Jitter spreads a fleet's retries: ``full`` waits anything up to the delay (reconnects, so
    that devices do not come back in lockstep), ``equal`` half of it fixed and half random
    (never retrying at once).
    """
    delay = min(base_s * 2 ** max(0, attempt - 1), float(cap_s))
    draw = (rng or random).uniform
    if jitter == "full":
        return draw(0, delay)
    if jitter == "equal":
        return delay / 2 + draw(0, delay / 2)
    return delay


class Backoff:
    """Delays that double from ``min_s`` up to ``max_s`` with every failure, until ``reset()``."""

    def __init__(self, min_s: float, max_s: float, *, jitter: Jitter = "none",
                 rng: random.Random | None = None):
        self.min_s = min_s
        self.max_s = max_s
        self.jitter = jitter
        self._rng = rng
        self.failures = 0

    def next_delay(self) -> float:
        """Count one more failure; the seconds to wait before trying again."""
        self.failures += 1
        return backoff_delay(self.failures, self.min_s, self.max_s, jitter=self.jitter, rng=self._rng)

    def reset(self) -> None:
        """It worked: the next failure waits ``min_s`` again."""
        self.failures = 0
