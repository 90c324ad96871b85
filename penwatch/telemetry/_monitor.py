"""``pw.Monitor``: records a run's metrics without ever blocking the training step.

``record`` runs on the training thread: it checks what it can check cheaply and queues
the step's device arrays. The intake (``_intake.py``) waits for them and measures device
time; the dispatcher (``_dispatch.py``) parses each record once, checks it for NaN/Inf,
evaluates the alerts and hands it to every sink's own delivery worker
(``_delivery.py``), so one slow or failing sink never holds up another.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from penwatch import _checks
from penwatch._version import __version__
from penwatch.alerts import Alert, NonFinite
from penwatch.schema import Metrics, RunInfo, RunStatus
from penwatch.sinks import Sink
from penwatch.telemetry import _signals
from penwatch.telemetry._dispatch import Dispatch
from penwatch.telemetry._intake import Intake, Item
from penwatch.telemetry._stats import MonitorStats

logger = logging.getLogger("penwatch.telemetry")

__all__ = ["Monitor", "MonitorStats"]

_FN = "penwatch.Monitor"
_LIVE: weakref.WeakSet[Monitor] = weakref.WeakSet()
_INT64 = (-(2**63), 2**63 - 1)


class Monitor:
    """Records a run's metrics to sinks from background threads.

    ``record`` only queues device arrays (no host synchronization on the training
    thread); a worker waits for them, measures device time, reads them, checks every
    metric for NaN/Inf (naming the first offender and, from ``"_leaf_nonfinite"``, the
    non-finite parameter/gradient leaves), evaluates the alerts and hands the record to
    every sink's own delivery thread. A failing sink buffers (``max_pending`` records, its
    own option), retries, and counts what it loses; training never sees the error.

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
      max_queue: records waiting for the device or the dispatcher at most (4,096: two
        seconds of a 2,000 steps/s loop); when full the oldest is dropped and counted
        (each sink has its own buffer, ``max_pending``).
      max_leaves: non-finite leaves kept in a report.
      close_timeout: seconds ``close`` waits for the queue and the sinks to drain.
      open_timeout: seconds the constructor waits for the sinks' first ``open``.
      config: JSON-able run configuration stored with the run (e.g. in SQLite).
    """

    def __init__(
        self,
        run: str | None = None,
        *,
        sinks: Iterable[Sink] = (),
        alerts: Iterable[Alert] | None = None,
        process: int | None = None,
        max_queue: int = 4096,
        max_leaves: int = 5,
        close_timeout: float = 10.0,
        open_timeout: float = 10.0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if run is None:
            run = time.strftime("run-%Y%m%d-%H%M%S")
        if not isinstance(run, str) or not run:
            raise _checks.option_error(_FN, "run", run, "a non-empty string")
        max_queue = _checks.check_int(_FN, "max_queue", max_queue, min=1)
        max_leaves = _checks.check_int(_FN, "max_leaves", max_leaves, min=0)
        self._close_timeout = _checks.check_positive(_FN, "close_timeout", close_timeout)
        open_timeout = _checks.check_nonnegative(_FN, "open_timeout", open_timeout)
        sinks = list(sinks)
        for i, sink in enumerate(sinks):
            if not isinstance(sink, Sink):
                raise _checks.option_error(
                    _FN, f"sinks[{i}]", sink, "a penwatch.sinks.Sink (e.g. pw.sinks.Logging())"
                )
        alerts = [NonFinite()] if alerts is None else list(alerts)
        for i, alert in enumerate(alerts):
            if not isinstance(alert, Alert):
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
                "alerts": [a.name for a in alerts],
            },
        )
        self.run, self.process = run, process
        self._dispatch = dispatch = Dispatch(info, sinks, alerts, max_leaves=max_leaves)
        self._intake = dispatch.intake = Intake(
            handle=dispatch.handle, max_queue=max_queue, name=f"penwatch-{run}"
        )
        self._closed = False
        self._status: RunStatus | None = None
        self._stop_signal: int | None = None
        self._recorded = self._refused = 0
        dispatch.wait_opened(open_timeout)
        weakref.finalize(self, _abandon, self._intake, dispatch, self._close_timeout).atexit = False
        _LIVE.add(self)
        _signals.install(self)

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
          step: the training step: an int in the int64 range, or an integer scalar
            device array (read later).
          metrics: a ``pw.Metrics`` from ``Pipeline.compute``, ``MultiPipeline.compute``
            or a penwatch train step, or a flat mapping of string keys to scalars (keys
            starting with ``_`` are not metrics, except ``"_leaf_nonfinite"``, which
            feeds the non-finite report).
          loss: the task loss. Becomes the record's ``loss`` (the ``penwatch_loss``
            gauge) and, when ``metrics`` has no ``"loss"``, the ``"loss"`` metric.
            Default: ``metrics["base_loss"]``, else ``metrics["loss"]``.
          pipeline: label of the penalties in this record.
          dispatched_at_ns: ``time.time_ns()`` taken just before the step was
            dispatched; default: now (the call to ``record``, just after dispatch).
          kind: ``"train_step"`` or ``"pipeline_compute"`` (span name); default:
            ``"train_step"`` when ``metrics`` has ``base_loss``, ``_leaf_nonfinite`` or
            gradient-diagnostic keys.

        Raises:
          TypeError, ValueError: ``step``, ``metrics``, ``pipeline`` or ``kind`` is not
            what is allowed (nothing is queued).
          NonFiniteDetected: when a ``pw.alerts.NonFinite(action="raise")`` fired on an
            earlier record (raised here, on the training thread, once).
        """
        now = time.time_ns()
        self._raise_pending()
        where = f"{_FN}.record"
        _check_step(where, step)
        if not isinstance(metrics, Mapping):
            raise TypeError(
                str(
                    _checks.option_error(
                        where, "metrics", metrics, "a mapping of metric names to scalars",
                        label="argument",
                    )
                )
            )  # fmt: skip
        payload = metrics if isinstance(metrics, Metrics) else dict(metrics)
        if payload is not metrics:
            for key in payload:
                if not isinstance(key, str):
                    raise TypeError(
                        str(_checks.option_error(
                            where, "metrics", f"key {key!r}", "string keys", label="argument"
                        ))
                    )  # fmt: skip
        if not isinstance(pipeline, str) or not pipeline:
            raise _checks.option_error(where, "pipeline", pipeline, "a non-empty string")
        if kind is not None:
            _checks.check_choice(where, "kind", kind, ("train_step", "pipeline_compute"))
        if dispatched_at_ns is not None and not isinstance(dispatched_at_ns, int):
            raise _checks.option_error(
                where, "dispatched_at_ns", dispatched_at_ns, "None or an int (time.time_ns())"
            )
        item = Item(
            payload=(payload, loss, step),
            step=int(step) if isinstance(step, int | np.integer) else None,
            pipeline=pipeline,
            kind=kind,
            wall_time=now / 1e9,
            dispatched_at_ns=now if dispatched_at_ns is None else dispatched_at_ns,
        )
        if self._intake.put(item):
            self._recorded += 1
        else:
            self._refused += 1
            if self._refused == 1:
                logger.warning("penwatch monitor %r: record() after close(); refused", self.run)

    def _raise_pending(self) -> None:
        error, self._dispatch.pending_error = self._dispatch.pending_error, None
        if error is not None:
            raise error

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything recorded so far was written by every sink (or counted
        as lost) and the sinks flushed.

        Returns:
          False when ``timeout`` seconds passed first (a sink still down or slow).
        """
        self._raise_pending()
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._intake.drained(_left(deadline)):
            return False
        # every sink is asked first, then waited for: they write side by side
        requests = [w.begin_flush() for w in self._dispatch.workers]
        return all([done.wait(_left(deadline)) for done in requests])

    def close(self, timeout: float | None = None, *, status: RunStatus | None = None) -> bool:
        """Drain the queue, then let every sink write what it holds and close. Idempotent.

        Args:
          timeout: seconds to wait in all (default ``close_timeout``); what is still
            queued after that is counted as lost (``close_timeout`` before the sinks,
            ``unfinished`` in a sink).
          status: how the run ended: ``"finished"`` (default), ``"stopped"`` (set by the
            SIGTERM/SIGINT handler) or ``"failed"`` (set by ``with`` on an exception).

        Returns:
          False when the timeout passed before everything was written.

        Raises:
          NonFiniteDetected: pending from a ``NonFinite(action="raise")`` alert.
        """
        if self._closed:
            self._raise_pending()
            return True
        self._closed = True
        if status is not None:
            _checks.check_choice(
                f"{_FN}.close", "status", status, ("finished", "stopped", "failed")
            )
        status = self._status or status or "finished"
        timeout = self._close_timeout if timeout is None else timeout
        done = _shutdown(self._intake, self._dispatch, status, timeout)
        _LIVE.discard(self)
        self._log_losses(done)
        self._raise_pending()
        return done

    def _log_losses(self, done: bool) -> None:
        stats = self.stats
        lost = {name: stats.lost(name) for name in stats.sinks}
        if not done or any(lost.values()):
            logger.warning(
                "penwatch monitor %r closed%s: %d records; lost before the sinks %s; per "
                "sink written/lost %s",
                self.run,
                "" if done else " after its timeout",
                stats.recorded,
                {k: v for k, v in stats.dropped.items() if v} or "none",
                {n: f"{s.written}/{lost[n]}" for n, s in stats.sinks.items()},
            )

    def _mark_stopped(self, signum: int) -> None:
        """Called by the SIGTERM/SIGINT handler: the run ends as ``stopped``."""
        if self._closed:
            return
        self._stop_signal = signum
        if self._status is None:
            self._status = "stopped"

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # An exception is propagating: never replace it (not with a pending alert error,
        # not with a failure of close itself).
        if self._status is None and not issubclass(exc_type, KeyboardInterrupt):
            self._status = "failed"
        elif self._status is None:
            self._status = "stopped"
        self._dispatch.pending_error = None
        try:
            self.close()
        except Exception:
            logger.exception("penwatch monitor %r: close() failed during an exception", self.run)
        self._dispatch.pending_error = None

    # -- counters ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stop_signal(self) -> int | None:
        """The stop signal (SIGTERM or SIGINT) received while this monitor was open, or
        None.

        penwatch's handler turns the signal into an exception in the main thread, but
        code the signal interrupts may swallow it (``penwatch demo`` was seen training
        on after Ctrl-C under load). A training loop that checks ``monitor.stop_signal``
        each step ends at the next one either way.
        """
        return self._stop_signal

    @property
    def stats(self) -> MonitorStats:
        """A snapshot of the counters (see :class:`MonitorStats`)."""
        d = self._dispatch
        return MonitorStats(
            recorded=self._recorded,
            processed=d.processed,
            dropped=d.dropped(),
            refused=self._refused,
            sinks={w.name: w.stats() for w in d.workers},
            events=d.events,
            alert_errors=d.alert_errors,
        )

    @property
    def records(self) -> int:
        """Records processed by the dispatcher so far."""
        return self._dispatch.processed

    @property
    def dropped(self) -> Mapping[str, int]:
        """Records lost before any sink saw them, by reason (see :class:`MonitorStats`)."""
        return self._dispatch.dropped()

    @property
    def sink_errors(self) -> Mapping[str, int]:
        """Exceptions raised per sink."""
        return {w.name: w.errors for w in self._dispatch.workers}

    @property
    def pending(self) -> int:
        """Records queued and not yet dispatched."""
        return self._intake.pending

    def __repr__(self) -> str:
        return f"Monitor(run={self.run!r}, process={self.process}, closed={self._closed})"


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _check_step(where: str, step: Any) -> None:
    """An int in the int64 range, or an integer scalar array (checked without a sync)."""
    if isinstance(step, int | np.integer) and not isinstance(step, bool):
        if _INT64[0] <= int(step) <= _INT64[1]:
            return
        raise _checks.option_error(
            where, "step", step, f"an integer in the int64 range [{_INT64[0]}, {_INT64[1]}]",
            label="argument",
        )  # fmt: skip
    if isinstance(step, jax.Array | np.ndarray) and not isinstance(step, bool):
        dtype = np.dtype(step.dtype)
        if step.shape == () and dtype.kind in "iu" and dtype != np.uint64:
            return
    raise TypeError(_step_message(where, step))


def _step_message(where: str, step: Any) -> str:
    allowed = "an int or an integer scalar array (not a bool, a float or a uint64)"
    return str(_checks.option_error(where, "step", step, allowed, label="argument"))


def _shutdown(intake: Intake, dispatch: Dispatch, status: RunStatus, timeout: float) -> bool:
    """Dispatch what is queued, let every sink write what it holds, close the sinks; give
    up at the deadline, counting what is left as lost. True when nothing was given up."""
    deadline = time.monotonic() + timeout
    done = intake.stop(_left(deadline))
    if not done:
        intake.seal()
    closing = [w.begin_close(status) for w in dispatch.workers]
    for worker, finished in zip(dispatch.workers, closing, strict=True):
        if not finished.wait(_left(deadline)):
            worker.seal()
            done = False
    return done


def _abandon(intake: Intake, dispatch: Dispatch, timeout: float) -> None:
    """A monitor garbage-collected without close: close it from a thread of its own."""
    threading.Thread(
        target=_shutdown,
        args=(intake, dispatch, "finished", timeout),
        name="penwatch-abandoned",
        daemon=True,
    ).start()


@atexit.register
def _close_all_at_exit() -> None:
    for monitor in list(_LIVE):
        try:
            monitor._dispatch.pending_error = None
            monitor.close()
        except Exception:
            logger.exception("penwatch: closing monitor %r at exit failed", monitor)
