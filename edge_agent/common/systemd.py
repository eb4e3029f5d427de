"""Talking to systemd: READY/WATCHDOG/STOPPING notifications and the watchdog's cadence."""

from __future__ import annotations

import logging
import os

import sdnotify

log = logging.getLogger(__name__)
_notifier = sdnotify.SystemdNotifier()


def notify(state: str) -> None:
    """Tell systemd ``state`` (e.g. ``READY=1``); without a notify socket this does nothing."""
    try:
        _notifier.notify(state)
    except Exception:  # noqa: BLE001 - no systemd, nothing to tell
        log.debug("systemd notify %s failed", state, exc_info=True)


def watchdog_interval_s(default: float = 1.0) -> float:
    """Half of systemd's WatchdogSec (``WATCHDOG_USEC``), the usual ping cadence."""
    usec = os.environ.get("WATCHDOG_USEC")
    if usec and usec.isdigit() and int(usec) > 0:
        return int(usec) / 2e6
    return default
