"""SIGTERM and SIGINT end a run as ``stopped``, with every record flushed (SPEC section 11).

Kubernetes, Slurm and ``docker stop`` end a job with SIGTERM, whose default action
kills the process at once: nothing queued would reach the sinks and the store would
show the run ``running`` forever. penwatch installs a handler (main thread only, once,
chaining to whatever handler was there) that marks every live monitor ``stopped`` and
turns the signal into an exception in the main thread — ``SystemExit(128 + signum)`` for
SIGTERM, ``KeyboardInterrupt`` for SIGINT, or the previous handler's own behaviour —
so the stack unwinds: ``with monitor:`` blocks and ``atexit`` close the monitors, which
drain their queues and write the status. Closing happens there, not inside the handler,
which may have interrupted the training thread while it held a monitor's lock.
"""

from __future__ import annotations

import logging
import signal
import threading
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("penwatch.telemetry")

__all__ = ["STOP_SIGNALS", "install"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_MONITORS: weakref.WeakSet[Any] = weakref.WeakSet()
_PREVIOUS: dict[int, Any] = {}


def install(monitor: Any) -> None:
    """Register ``monitor`` to be marked stopped on SIGTERM/SIGINT; install the handler
    once (only possible from the main thread; elsewhere the monitor is still closed at
    exit, and a note is logged)."""
    _MONITORS.add(monitor)
    if threading.current_thread() is not threading.main_thread():
        if not _PREVIOUS:
            logger.info(
                "penwatch: monitor created outside the main thread; SIGTERM/SIGINT handlers "
                "not installed (create one monitor in the main thread to have them)"
            )
        return
    for sig in STOP_SIGNALS:
        current = signal.getsignal(sig)
        if current is _handle:
            continue
        _PREVIOUS[sig] = current
        signal.signal(sig, _handle)


def _handle(signum: int, frame: Any) -> None:
    for monitor in list(_MONITORS):
        monitor._mark_stopped(signum)
    previous: Callable[[int, Any], Any] | int | None = _PREVIOUS.get(signum)
    if callable(previous):
        previous(signum, frame)  # e.g. the default SIGINT handler: KeyboardInterrupt
        return
    if previous == signal.SIG_IGN:
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)
