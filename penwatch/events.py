"""Seed-style telemetry events: attach handlers to named events, emit from host code.

The Python form of the Elixir ``:telemetry`` events that the seed library emits. An event
is a tuple of strings; a handler is called as ``fn(event, measurements, metadata)``::

    import penwatch as pw

    def log_stop(event, measurements, metadata):
        print(metadata["pipeline"], measurements["duration"] / 1e6, "ms")

    pw.events.attach("my-logger", pw.events.PIPELINE_COMPUTE_STOP, log_stop)
    total, metrics = pipe.compute(x)            # host-side call -> start + stop events
    pw.events.detach("my-logger")

Events emitted by penwatch:

=============================================  ======================  =====================
event                                          measurements            metadata
=============================================  ======================  =====================
``("penwatch","pipeline","compute","start")``  ``system_time`` (ns),   ``pipeline``, ``size``
                                               ``monotonic_time`` (ns)
``("penwatch","pipeline","compute","stop")``   ``duration`` (ns),      ``pipeline``, ``size``,
                                               ``monotonic_time`` (ns) ``metrics``, ``total``,
                                                                       ``track_grad_norms``
``("penwatch","pipeline","compute",            ``duration`` (ns),      ``pipeline``, ``size``,
"exception")``                                 ``monotonic_time`` (ns) ``kind``, ``reason``
=============================================  ======================  =====================

Rules:

* Events come from host-side calls only (a ``compute`` called outside any ``jax.jit``
  trace). Traced code has no side effects, so a ``compute`` inside a jitted function
  emits nothing.
* Emitting never synchronizes with the device: ``metrics`` and ``total`` are the device
  arrays ``compute`` returns (possibly still being computed), and ``duration`` is host
  *dispatch* time, not device time. Converting values to Python numbers, and measuring
  device time, is the telemetry layer's job (``penwatch.Monitor``), off the critical path.
* A handler that raises is logged (logger ``penwatch.events``) and detached; the caller
  never sees the exception.
* Attaching, detaching and emitting are thread-safe; handlers run in the emitting
  thread, outside the registry lock (a handler may attach or detach handlers).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "PIPELINE_COMPUTE",
    "PIPELINE_COMPUTE_EXCEPTION",
    "PIPELINE_COMPUTE_START",
    "PIPELINE_COMPUTE_STOP",
    "Event",
    "Handler",
    "HandlerInfo",
    "attach",
    "attach_many",
    "detach",
    "execute",
    "has_handlers",
    "list_handlers",
    "span",
]

logger = logging.getLogger(__name__)

Event = tuple[str, ...]
Handler = Callable[[Event, Mapping[str, Any], Mapping[str, Any]], Any]

PIPELINE_COMPUTE: Event = ("penwatch", "pipeline", "compute")
"""Prefix of the pipeline compute span events."""
PIPELINE_COMPUTE_START: Event = (*PIPELINE_COMPUTE, "start")
PIPELINE_COMPUTE_STOP: Event = (*PIPELINE_COMPUTE, "stop")
PIPELINE_COMPUTE_EXCEPTION: Event = (*PIPELINE_COMPUTE, "exception")


class HandlerInfo(NamedTuple):
    """One attached handler: its id, the events it listens to, and the function."""

    handler_id: str
    events: tuple[Event, ...]
    fn: Handler


_lock = threading.Lock()
_by_id: dict[str, HandlerInfo] = {}
_by_event: dict[Event, tuple[HandlerInfo, ...]] = {}


def _as_event(event: Sequence[str], *, fn_name: str) -> Event:
    if isinstance(event, str) or not all(isinstance(part, str) for part in event):
        raise ValueError(
            f"{fn_name}: event must be a sequence of strings such as "
            f"('penwatch', 'pipeline', 'compute', 'stop'), got {event!r}"
        )
    out = tuple(event)
    if not out:
        raise ValueError(f"{fn_name}: event must not be empty")
    return out


def attach_many(handler_id: str, events: Sequence[Sequence[str]], fn: Handler) -> None:
    """Attach one handler to several events under one id.

    Args:
      handler_id: unique id used to :func:`detach` the handler.
      events: the events, each a sequence of strings.
      fn: called as ``fn(event, measurements, metadata)``.

    Raises:
      ValueError: when ``handler_id`` is already attached, ``fn`` is not callable or an
        event is not a non-empty sequence of strings.
    """
    if not isinstance(handler_id, str) or not handler_id:
        raise ValueError(f"attach: handler_id must be a non-empty string, got {handler_id!r}")
    if not callable(fn):
        raise ValueError(f"attach: fn must be callable, got {fn!r}")
    if isinstance(events, str):
        raise ValueError(f"attach_many: events must be a sequence of events, got {events!r}")
    evs = tuple(dict.fromkeys(_as_event(e, fn_name="attach") for e in events))
    info = HandlerInfo(handler_id, evs, fn)
    with _lock:
        if handler_id in _by_id:
            raise ValueError(f"attach: handler_id {handler_id!r} is already attached")
        _by_id[handler_id] = info
        for ev in evs:
            _by_event[ev] = (*_by_event.get(ev, ()), info)


def attach(handler_id: str, event: Sequence[str], fn: Handler) -> None:
    """Attach ``fn`` to one event.

    Args:
      handler_id: unique id used to :func:`detach` the handler.
      event: the event, e.g. :data:`PIPELINE_COMPUTE_STOP`.
      fn: called as ``fn(event, measurements, metadata)``.

    Raises:
      ValueError: when ``handler_id`` is already attached or the arguments are malformed.
    """
    attach_many(handler_id, [event], fn)


def _remove(info: HandlerInfo) -> bool:
    # Caller holds the lock. Removes exactly this registration (not a newer one that
    # reused the id).
    if _by_id.get(info.handler_id) is not info:
        return False
    del _by_id[info.handler_id]
    for ev in info.events:
        rest = tuple(h for h in _by_event.get(ev, ()) if h is not info)
        if rest:
            _by_event[ev] = rest
        else:
            _by_event.pop(ev, None)
    return True


def detach(handler_id: str) -> bool:
    """Detach a handler; returns whether it was attached."""
    with _lock:
        info = _by_id.get(handler_id)
        return info is not None and _remove(info)


def list_handlers(prefix: Sequence[str] = ()) -> list[HandlerInfo]:
    """Attached handlers listening to at least one event that starts with ``prefix``."""
    prefix = tuple(prefix)
    with _lock:
        infos = list(_by_id.values())
    return [h for h in infos if any(ev[: len(prefix)] == prefix for ev in h.events)]


def has_handlers(event: Sequence[str]) -> bool:
    """Whether any handler listens to ``event`` (lets callers skip building payloads)."""
    with _lock:
        return tuple(event) in _by_event


def execute(
    event: Sequence[str],
    measurements: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Emit ``event``: call every handler attached to it, in attach order.

    A handler that raises is logged with its traceback and detached; the exception is not
    propagated, so emitting never breaks the caller.

    Args:
      event: the event, a tuple of strings.
      measurements: numbers describing the event (e.g. ``duration`` in ns).
      metadata: context (e.g. ``pipeline``, ``metrics``); device arrays are passed as is.
    """
    event = tuple(event)
    with _lock:
        handlers = _by_event.get(event, ())  # an immutable snapshot
    if not handlers:
        return
    metadata = {} if metadata is None else metadata
    for info in handlers:
        try:
            info.fn(event, measurements, metadata)
        except Exception:
            logger.exception(
                "penwatch event handler %r raised on event %r; detaching it",
                info.handler_id,
                event,
            )
            with _lock:
                _remove(info)


@contextlib.contextmanager
def span(prefix: Sequence[str], metadata: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Emit ``prefix + ("start",)`` now and ``("stop",)`` or ``("exception",)`` at exit.

    Start measurements: ``system_time`` (Unix ns) and ``monotonic_time`` (ns); stop:
    ``duration`` (ns of host wall time between start and stop) and ``monotonic_time``.
    Stop metadata is ``metadata`` plus whatever the body put into the yielded dict;
    exception metadata adds ``kind`` (exception class name) and ``reason`` (the exception).
    The exception is re-raised. When nobody listens, nothing is measured.

    Args:
      prefix: event prefix, e.g. :data:`PIPELINE_COMPUTE`.
      metadata: metadata for all three events.

    Yields:
      A dict the body fills with stop metadata.
    """
    prefix = tuple(prefix)
    stop_metadata: dict[str, Any] = dict(metadata)
    start_ev, stop_ev, exc_ev = (*prefix, "start"), (*prefix, "stop"), (*prefix, "exception")
    if not (has_handlers(start_ev) or has_handlers(stop_ev) or has_handlers(exc_ev)):
        yield stop_metadata
        return
    t0 = time.monotonic_ns()
    execute(start_ev, {"system_time": time.time_ns(), "monotonic_time": t0}, dict(metadata))
    try:
        yield stop_metadata
    except BaseException as exc:
        t1 = time.monotonic_ns()
        execute(
            exc_ev,
            {"duration": t1 - t0, "monotonic_time": t1},
            {**stop_metadata, "kind": type(exc).__name__, "reason": exc},
        )
        raise
    t1 = time.monotonic_ns()
    execute(stop_ev, {"duration": t1 - t0, "monotonic_time": t1}, stop_metadata)
