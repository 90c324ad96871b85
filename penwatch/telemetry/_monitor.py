"""``pw.Monitor``: records a run's metrics without ever blocking the training step.

``record`` runs on the training thread and only queues the step's device arrays; the
worker (``_worker.py``, ``_core.py``) waits for them, measures device time, materializes
them in one go, checks every metric for NaN/Inf, evaluates the alerts and fans the
record and its events out to every sink, each behind a guard that isolates failures.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import jax

from penwatch import _checks
from penwatch._version import __version__
from penwatch.schema import RunInfo
from penwatch.sinks._base import Sink
from penwatch.telemetry._core import Core
from penwatch.telemetry._worker import Item, Worker

logger = logging.getLogger("penwatch.telemetry")

__all__ = ["Monitor", "MonitorStats"]

_FN = "penwatch.Monitor"
_LIVE: weakref.WeakSet[Monitor] = weakref.WeakSet()


@dataclasses.dataclass(frozen=True)
class MonitorStats:
    """Counters of a monitor, for tests and health checks.

    Attributes:
      recorded: ``record`` calls accepted on the training thread.
      processed: records materialized and handed to the sinks.
      dropped: records lost before reaching the sinks, by reason: ``queue_full`` (the
        bounded queue overflowed; the oldest went), ``closed`` (recorded after close),
        ``materialize_error`` (the arrays could not be read, e.g. donated buffers), and
        ``sink_error``: records some sink never wrote (the sum of ``sink_lost``).
      sink_errors: exceptions raised per sink (by name).
      sink_lost: records each sink never wrote: evicted from its retry buffer while it
        kept failing, or still buffered when the monitor closed.
      events: events emitted (non-finite reports and alerts).
      alert_errors: exceptions raised by alerts (logged, never propagated).
    """

    recorded: int
    processed: int
    dropped: Mapping[str, int]
    sink_errors: Mapping[str, int]
    sink_lost: Mapping[str, int]
    events: int
    alert_errors: int


class Monitor:
    """Records a run's metrics to sinks from a background worker.

    ``record`` only queues device arrays (no host synchronization on the training
    thread); a worker waits for them, measures device time, reads them with one
    ``jax.device_get``, checks every metric for NaN/Inf (naming the first offender and,
    from ``"_leaf_nonfinite"``, the non-finite parameter/gradient leaves), evaluates the
    alerts and writes to every sink. A failing sink is logged once, counted and retried
    with exponential backoff; training never sees the error.

    Example:
      >>> import penwatch as pw
      >>> seen = []
      >>> with pw.Monitor("demo", sinks=[pw.sinks.Callback(seen.append)]) as mon:
      ...     mon.record(0, {"l1": 0.5, "l1_weight": 1.0, "l1_weighted": 0.5, "total": 0.5})
      >>> seen[0].penalty("l1").weighted
      0.5

    Args:
      run: run name (a label on every metric; default ``run-<date>-<time>``).
      sinks: where records go (``pw.sinks.*`` or any :class:`penwatch.sinks.Sink`).
      alerts: ``pw.alerts.*`` rules; None means ``[pw.alerts.NonFinite()]`` (warn once
        per non-finite episode), ``[]`` none.
      process: process index label; None means ``jax.process_index()``.
      max_queue: records held at most; when full the oldest is dropped and counted.
      max_leaves: non-finite leaves kept in a report.
      flush_interval: seconds between automatic sink flushes while records flow.
      close_timeout: seconds ``close`` waits for the queue to drain.
      config: JSON-able run configuration stored with the run (e.g. in SQLite).
    """

    def __init__(
        self,
        run: str | None = None,
        *,
        sinks: Iterable[Sink] = (),
        alerts: Iterable[Any] | None = None,
        process: int | None = None,
        max_queue: int = 1024,
        max_leaves: int = 5,
        flush_interval: float = 1.0,
        close_timeout: float = 10.0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if run is None:
            run = time.strftime("run-%Y%m%d-%H%M%S")
        if not isinstance(run, str) or not run:
            raise _checks.option_error(_FN, "run", run, "a non-empty string")
        max_queue = _checks.check_int(_FN, "max_queue", max_queue, min=1)
        max_leaves = _checks.check_int(_FN, "max_leaves", max_leaves, min=0)
        flush_interval = _checks.check_positive(_FN, "flush_interval", flush_interval)
        self._close_timeout = _checks.check_positive(_FN, "close_timeout", close_timeout)
        sinks = list(sinks)
        for i, sink in enumerate(sinks):
            if not isinstance(sink, Sink):
                raise _checks.option_error(
                    _FN, f"sinks[{i}]", sink, "a penwatch.sinks.Sink (e.g. pw.sinks.Logging())"
                )
        if alerts is None:
            from penwatch.alerts import NonFinite

            alerts = [NonFinite()]
        alerts = list(alerts)
        for i, alert in enumerate(alerts):
            if not callable(getattr(alert, "evaluate", None)):
                raise _checks.option_error(
                    _FN, f"alerts[{i}]", alert, "a penwatch alert (e.g. pw.alerts.NonFinite())"
                )
        if process is None:
            process = jax.process_index()
        process = _checks.check_int(_FN, "process", process, min=0)
        info = RunInfo(
            run=run,
            process=process,
            version=__version__,
            backend=jax.default_backend(),
            devices=jax.device_count(),
            started_at=time.time(),
            config={
                **dict(config or {}),
                "sinks": [type(s).__name__ for s in sinks],
                "alerts": [getattr(a, "name", type(a).__name__) for a in alerts],
            },
        )
        self.run, self.process = run, process
        self._core = core = Core(info, sinks, alerts, max_leaves)
        self._closed = False
        self._worker = Worker(
            handle=core.handle,
            on_flush=core.flush,
            on_stop=core.stop,
            on_start=core.start,
            max_queue=max_queue,
            flush_interval=flush_interval,
            name=f"penwatch-{run}",
        )
        core.queue_drops = lambda w=self._worker: w.dropped
        core.started.wait(10.0)  # sinks opened (e.g. /metrics bound) before training starts
        weakref.finalize(self, self._worker.request_stop).atexit = False
        _LIVE.add(self)

    # -- training thread ---------------------------------------------------------------

    def record(
        self,
        step: Any,
        metrics: Mapping[str, Any],
        *,
        loss: Any = None,
        pipeline: str = "default",
        dispatched_at_ns: int | None = None,
        kind: str | None = None,
    ) -> None:
        """Queue one step's metrics; returns at once without reading device values.

        Args:
          step: the training step (an int, or a device scalar read later).
          metrics: a flat dict from ``Pipeline.compute``, ``MultiPipeline.compute`` or a
            penwatch train step (device arrays or numbers; keys starting with ``_`` are
            not metrics, except ``"_leaf_nonfinite"`` which feeds the non-finite report).
          loss: the task loss. Becomes the record's ``loss`` (the ``penwatch_loss``
            gauge) and, when ``metrics`` has no ``"loss"``, the ``"loss"`` metric.
            Default: ``metrics["base_loss"]``, else ``metrics["loss"]``.
          pipeline: label of the penalties in this record.
          dispatched_at_ns: ``time.time_ns()`` taken just before the step was
            dispatched; the duration runs from there to when the results are ready.
            Default: now (the call to ``record``), which misses the dispatch itself.
          kind: ``"train_step"`` or ``"pipeline_compute"`` (span name); default:
            ``"train_step"`` when ``metrics`` has ``base_loss``, ``_leaf_nonfinite`` or
            gradient-diagnostic keys.

        Raises:
          NonFiniteDetected: when a ``pw.alerts.NonFinite(action="raise")`` fired on an
            earlier record (raised here, on the training thread, once).
        """
        now = time.time_ns()
        self._raise_pending()
        if not isinstance(metrics, Mapping):
            raise _checks.option_error(
                f"{_FN}.record",
                "metrics",
                metrics,
                "a mapping of metric names to scalars",
                label="argument",
            )
        if kind is not None:
            _checks.check_choice(f"{_FN}.record", "kind", kind, ("train_step", "pipeline_compute"))
        item = Item(
            payload=(dict(metrics), loss, step),
            step=step,
            pipeline=pipeline,
            kind=kind,
            wall_time=now / 1e9,
            dispatched_at_ns=now if dispatched_at_ns is None else dispatched_at_ns,
        )
        if self._worker.put(item):
            self._core.recorded += 1
        else:
            self._core.closed_drops += 1
            if self._core.closed_drops == 1:
                logger.warning("penwatch monitor %r: record() after close(); dropped", self.run)

    def _raise_pending(self) -> None:
        error, self._core.pending_error = self._core.pending_error, None
        if error is not None:
            raise error

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything recorded so far reached the sinks and they flushed.

        Returns:
          False when ``timeout`` seconds passed first.
        """
        self._raise_pending()
        return self._worker.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Drain the queue, flush and close every sink. Idempotent.

        Args:
          timeout: seconds to wait (default ``close_timeout``); records still queued
            after that are abandoned to the daemon worker.

        Returns:
          False when the timeout passed before the worker finished.

        Raises:
          NonFiniteDetected: pending from a ``NonFinite(action="raise")`` alert.
        """
        first = not self._closed
        self._closed = True
        done = self._worker.stop(self._close_timeout if timeout is None else timeout)
        if first and not done:
            logger.warning(
                "penwatch monitor %r: close() timed out with %d records queued",
                self.run,
                self._worker.pending,
            )
        _LIVE.discard(self)
        self._raise_pending()
        return done

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the training error with a pending alert error
            self._core.pending_error = None
            self.close()
            self._core.pending_error = None

    # -- counters ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> MonitorStats:
        """A snapshot of the counters (see :class:`MonitorStats`)."""
        core = self._core
        return MonitorStats(
            recorded=core.recorded,
            processed=core.processed,
            dropped=core.dropped(),
            sink_errors={g.name: g.errors for g in core.guards},
            sink_lost={g.name: g.lost for g in core.guards},
            events=core.events,
            alert_errors=core.alert_errors,
        )

    @property
    def records(self) -> int:
        """Records processed by the worker so far."""
        return self._core.processed

    @property
    def dropped(self) -> Mapping[str, int]:
        """Records lost by reason (see :class:`MonitorStats`)."""
        return self._core.dropped()

    @property
    def sink_errors(self) -> Mapping[str, int]:
        """Exceptions raised per sink."""
        return {g.name: g.errors for g in self._core.guards}

    @property
    def pending(self) -> int:
        """Records queued and not yet processed."""
        return self._worker.pending

    def __repr__(self) -> str:
        return f"Monitor(run={self.run!r}, process={self.process}, closed={self._closed})"


@atexit.register
def _close_all_at_exit() -> None:
    for monitor in list(_LIVE):
        try:
            monitor._core.pending_error = None
            monitor.close()
        except Exception:
            logger.exception("penwatch: closing monitor %r at exit failed", monitor)
