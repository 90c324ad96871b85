"""The dispatch thread's work: parse once, check, alert, open spans, fan out to sinks.

Each ready record is materialized (one host read per packed buffer), parsed **once**
into a :class:`~penwatch.schema.StepRecord` (its :class:`~penwatch.schema.Layout` is
cached per key tuple), checked for NaN/Inf, shown to the alerts, and handed to every
sink's :class:`~penwatch.telemetry._delivery.SinkWorker`, which writes it from a
thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from penwatch.alerts import Alert
from penwatch.diagnostics import suggested_weight_metrics
from penwatch.schema import (
    LEAF_COUNTS,
    Event,
    Layout,
    LeafReport,
    Metrics,
    RunInfo,
    StepRecord,
    find_nonfinite,
    layout_of,
    leaf_reports,
)
from penwatch.schema._host import host_copy, host_rows
from penwatch.sinks import Sink
from penwatch.telemetry._delivery import SinkWorker
from penwatch.telemetry._gaps import Gap
from penwatch.telemetry._intake import Intake, Item
from penwatch.telemetry._stats import LOSS_REASONS

logger = logging.getLogger("penwatch.telemetry")

__all__ = ["DROP_REASONS", "Dispatch"]

DROP_REASONS = ("queue_full", "materialize_error", "invalid", "close_timeout")
"""Why the monitor lost a record before any sink saw it: the intake queue overflowed,
its arrays could not be read (e.g. donated buffers), its values could not be converted,
or it was still queued when ``close`` stopped waiting."""


class Dispatch:
    """Dispatch-thread state. Threads reference this, never the Monitor (so it can be GC'd)."""

    def __init__(
        self,
        info: RunInfo,
        sinks: Sequence[Sink],
        alerts: Sequence[Alert],
        *,
        max_leaves: int,
    ) -> None:
        self.info, self.alerts, self.max_leaves = info, list(alerts), max_leaves
        names: dict[str, int] = {}
        self.workers: list[SinkWorker] = []
        for sink in sinks:
            base = sink.name or type(sink).__name__
            names[base] = names.get(base, 0) + 1
            name = base if names[base] == 1 else f"{base}#{names[base]}"
            self.workers.append(SinkWorker(sink, name, info))
        self._tracers = [w for w in self.workers if type(w.sink).begin_step is not Sink.begin_step]
        self.processed = self.events = self.alert_errors = 0
        self.materialize_errors = self.invalid = 0
        self.pending_error: BaseException | None = None
        self.intake: Intake | None = None
        self._reported_drops = 0
        self._losses: Mapping[str, int] = {}
        self._loss_version: tuple[int, ...] = ()
        self._lock = threading.Lock()

    def dropped(self) -> dict[str, int]:
        """Records lost before reaching any sink, by reason (:data:`DROP_REASONS`)."""
        intake = self.intake
        return {
            "queue_full": intake.dropped if intake else 0,
            "materialize_error": self.materialize_errors,
            "invalid": self.invalid,
            "close_timeout": intake.abandoned if intake else 0,
        }

    def losses(self) -> Mapping[str, int]:
        """Every record lost so far, by reason: before the sinks (:data:`DROP_REASONS`)
        and, summed over the sinks, ``sink_overflow``, ``sink_poison``,
        ``sink_unfinished`` (the ``penwatch_telemetry_dropped_total`` reasons). The
        same object while nothing changed (records share it; nobody mutates it)."""
        intake = self.intake
        version = (
            intake.dropped if intake else 0,
            intake.abandoned if intake else 0,
            self.materialize_errors,
            self.invalid,
            sum(w.loss_version for w in self.workers),
        )
        if version != self._loss_version:
            out = self.dropped()
            for reason in LOSS_REASONS:
                out[f"sink_{reason}"] = sum(w.lost[reason] for w in self.workers)
            self._losses, self._loss_version = out, version
        return self._losses

    def wait_opened(self, timeout: float) -> None:
        """Wait (bounded) until every sink's first ``open`` returned, so that e.g.
        ``/metrics`` is bound before training starts."""
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.started.wait(max(deadline - time.monotonic(), 0.0))

    def handle(self, items: list[Item]) -> None:
        """Build the records of a batch of ready items, then fan them out together (one
        lock per sink per batch: fewer hand-offs competing with training for the GIL).

        The batch goes through one phase at a time (every record built, then every
        record shown to the alerts, then every span begun), not record by record: next
        to a busy device each wake-up starts from cold caches, and a phase repeated
        over the batch runs warm after its first record. At a ~10 ms step this took the
        dispatcher from ≈ 430 to ≈ 320 µs of CPU per step (docs/benchmarks.md).
        """
        records = list(self._records(items))
        if not records:
            return
        events = [self._drop_events(record) + self.evaluate(record) for record in records]
        if self._tracers:
            records = [self._begin_step(record) for record in records]
        out: list[StepRecord | Event] = []
        for before, record in zip(events, records, strict=True):
            out.extend(before)
            out.append(record)
        intake = self.intake
        with intake.fanout_lock if intake else _NO_LOCK:
            if intake is not None and intake.sealed:
                intake.abandoned += len(records)
                return
            self.processed += len(records)
            for worker in self.workers:
                worker.put_many(out)

    def _begin_step(self, record: StepRecord) -> StepRecord:
        """Open the record's span in every tracing sink; the record with its trace id."""
        trace_id = None
        for worker in self._tracers:
            try:
                trace_id = worker.sink.begin_step(record) or trace_id
            except Exception as exc:
                worker.errors += 1
                logger.debug("penwatch sink %s: begin_step failed: %s", worker.name, exc)
        return record.with_trace_id(trace_id) if trace_id else record

    def _records(self, items: list[Item]) -> Iterator[StepRecord]:
        """The records of a batch, in order. Runs of ``Metrics`` of one structure whose
        only unpacked entries are a train step's NaN/Inf leaf counts (:func:`_batchable`)
        are read and converted together (:meth:`Metrics.scalar_rows`); any other item,
        and a run that cannot be read that way, is built alone."""
        run: list[Item] = []
        for item in items:
            if _batchable(item):
                if run and run[0].payload[0]._structure != item.payload[0]._structure:
                    yield from self._build_run(run)
                    run = []
                run.append(item)
                continue
            if run:
                yield from self._build_run(run)
                run = []
            record = self._record(item)
            if record is not None:
                yield record
        if run:
            yield from self._build_run(run)

    def _build_run(self, run: list[Item]) -> Iterator[StepRecord]:
        first: Metrics = run[0].payload[0]
        keys = first.scalar_keys
        layout = layout_of(keys, first.penalties)
        rows: Sequence[tuple[float, ...]] = ()
        if len(run) > 1 and not layout.gram_keys:  # weight suggestions go step by step
            try:
                rows = Metrics.scalar_rows([item.payload[0] for item in run])
            except Exception:  # e.g. one donated buffer: each item alone, its error counted
                rows = ()
        if not rows:
            for item in run:
                record = self._record(item)
                if record is not None:
                    yield record
            return
        dropped = self.losses()
        unpacked = first.unpacked_keys
        leaf_tree = LEAF_COUNTS in unpacked
        alone = _reads_leaves_of_run([item.payload[0] for item in run], unpacked)
        for item, row, by_itself in zip(run, rows, alone, strict=True):
            if by_itself:
                record = self._record(item)  # a bad leaf somewhere: its report, built alone
                if record is not None:
                    yield record
                continue
            values = dict(zip(keys, row, strict=True))
            yield self._make(
                item,
                item.payload[2],
                values,
                layout,
                numbers=row,
                dropped=dropped,
                leaf_tree=leaf_tree,
            )

    def _record(self, item: Item) -> StepRecord | None:
        try:
            return self.build(item)
        except Exception as exc:
            counter = "materialize_errors" if item.error is not None else "invalid"
            setattr(self, counter, getattr(self, counter) + 1)
            if getattr(self, counter) == 1:
                logger.error(
                    "penwatch monitor: step %r's results could not be %s (%s: %s); record "
                    "dropped and counted as %s (logged once)",
                    item.step,
                    "read" if item.error is not None else "converted",
                    type(exc).__name__,
                    exc,
                    "materialize_error" if item.error is not None else "invalid",
                )
            return None

    def build(self, item: Item) -> StepRecord:
        if item.error is not None:
            raise item.error
        metrics, loss, step = item.payload
        values, reserved, penalties = _host_values(metrics)
        tree = reserved.get(LEAF_COUNTS)
        leaf_counts = None if tree is None else _materialize(tree)
        explicit = None
        if loss is not None:
            explicit = _scalar(_materialize(loss))
            values.setdefault("loss", explicit)
        layout = layout_of(values, penalties)
        if layout.gram_keys:  # a diagnostics step (the layout is parsed once per key tuple)
            suggestions = _suggestions(values)
            if suggestions:
                values.update(suggestions)
                layout = layout_of(values, penalties)
        return self._make(
            item,
            _step(step),
            values,
            layout,
            numbers=tuple(values.values()),
            loss=explicit,
            leaves=leaf_reports(leaf_counts, max_leaves=self.max_leaves),
            leaf_tree=tree is not None,
            dropped=self.losses(),
        )

    def _make(
        self,
        item: Item,
        step: int,
        values: dict[str, float],
        layout: Layout,
        *,
        numbers: Sequence[float],
        dropped: Mapping[str, int],
        loss: float | None = None,
        leaves: tuple[LeafReport, ...] = (),
        leaf_tree: bool = False,
    ) -> StepRecord:
        """The record of one step (``numbers``: ``values``' values, in order). Without an
        explicit ``loss`` the base loss is the ``base_loss`` (else ``loss``) metric; the
        kind is the item's, else a train step's when it carries per-leaf counts, a base
        loss or gradient terms."""
        if loss is None:
            loss = values.get("base_loss", values.get("loss"))
        kind = item.kind or (
            "train_step"
            if leaf_tree or "base_loss" in values or layout.terms
            else "pipeline_compute"
        )
        return StepRecord(
            run=self.info.run,
            process=self.info.process,
            step=step,
            pipeline=item.pipeline,
            wall_time=item.wall_time,
            values=values,
            layout=layout,
            loss=loss,
            duration_seconds=None if item.device_ns is None else item.device_ns / 1e9,
            nonfinite=find_nonfinite(numbers, layout),
            leaves=leaves,
            kind=kind,  # type: ignore[arg-type]
            dispatched_at_ns=item.dispatched_at_ns,
            ready_at_ns=item.ready_at_ns,
            dropped=dropped,
        )

    def _drop_events(self, record: StepRecord) -> list[Event]:
        """A ``records_dropped`` event for intake overflow since the last record."""
        intake = self.intake
        if intake is None or intake.dropped == self._reported_drops:
            return []
        with intake._cond:  # the training thread appends under this lock
            steps, intake.dropped_steps = intake.dropped_steps, []
            count, self._reported_drops = intake.dropped - self._reported_drops, intake.dropped
        gap = Gap()
        for step in steps:
            gap.add(step)
        gap.count = count  # records whose step was a device scalar have no step here
        why = "its queue (max_queue) was full"
        return [gap.event(self.info, at=record.step, sink=None, reason="queue_full", why=why)]

    def evaluate(self, record: StepRecord) -> list[Event]:
        events: list[Event] = []
        for alert in self.alerts:
            try:
                events.extend(alert.evaluate(record))
                error = alert.take_error()
            except Exception:
                self.alert_errors += 1
                logger.exception("penwatch alert %r raised; ignored", alert)
                continue
            if error is not None and self.pending_error is None:
                self.pending_error = error
        self.events += len(events)
        return events


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


_BATCHABLE_UNPACKED = frozenset({(), (LEAF_COUNTS,)})
"""Unpacked keys a record built in a run may have: none, or a train step's leaf counts
(one ``TreeLeafCounts`` array per step, read for the whole run in one host copy)."""


def _batchable(item: Item) -> bool:
    """An item that can be built in a run: a ``Metrics`` packed but for a train step's
    leaf counts, no separate loss, an int step."""
    if item.error is not None:
        return False
    metrics, loss, step = item.payload
    return (
        type(metrics) is Metrics
        and loss is None
        and type(step) is int
        and metrics.unpacked_keys in _BATCHABLE_UNPACKED
    )


def _reads_leaves_of_run(run: list[Metrics], unpacked: tuple[str, ...]) -> list[bool]:
    """For each ``Metrics`` of a run (one structure, unpacked keys ``unpacked``), whether
    its per-leaf NaN/Inf counts hold a non-zero count: such a record is built alone, with
    its leaf report. The run's counts arrays are read in one host copy
    (:func:`host_rows`); when they cannot be (counts that are not one
    ``TreeLeafCounts`` array, shapes that differ, a deleted buffer) every record is
    built alone, where an error is counted."""
    if LEAF_COUNTS not in unpacked:
        return [False] * len(run)
    try:
        block = host_rows([metrics[LEAF_COUNTS].counts for metrics in run])
    except Exception:
        return [True] * len(run)
    return block.reshape(len(run), -1).any(axis=1).tolist()


def _host_values(
    metrics: Any,
) -> tuple[dict[str, float], Mapping[str, Any], tuple[str, ...] | None]:
    """``(scalar values in order, reserved entries, penalty order or None)``.

    A ``pw.Metrics`` is read with one host copy per packed buffer. A plain mapping is
    read value by value (Python numbers as they are, arrays through one ``device_get``
    on accelerators); entries that are not real scalars (a pairwise matrix) are skipped.
    """
    if isinstance(metrics, Metrics):
        return metrics.scalars(), metrics.reserved, metrics.penalties
    values: dict[str, Any] = {}
    reserved: dict[str, Any] = {}
    arrays = False
    for key, value in metrics.items():
        if key[:1] == "_":
            reserved[key] = value
        elif type(value) is float:
            values[key] = value
        else:
            values[key] = value
            arrays = True
    if arrays:
        host = _materialize(values)
        values = {}
        for key, value in host.items():
            number = _scalar(value)
            if number is not None:
                values[key] = number
    return values, reserved, None


def _suggestions(values: dict[str, float]) -> dict[str, float]:
    """``<penalty>_suggested_weight`` from a diagnostics step's Gram matrix (SPEC §12).

    Advisory: a failure here is logged and leaves the record as it is.
    """
    try:
        return suggested_weight_metrics(values)
    except Exception as exc:
        logger.warning("penwatch: weight suggestion failed (%s: %s)", type(exc).__name__, exc)
        return {}


def _step(step: Any) -> int:
    if isinstance(step, int):
        return step
    value = np.asarray(step)
    if value.shape != () or value.dtype.kind not in "iu":
        raise TypeError(f"step must be an integer scalar, got {step!r}")
    return int(value)


def _materialize(tree: Any) -> Any:
    """Host copies of a pytree's arrays, in one go.

    On accelerators: one ``jax.device_get`` of the whole tree (all transfers started
    together). On the CPU backend each array is copied by address
    (:func:`~penwatch.schema._host.host_copy`): ``np.asarray`` and ``device_get`` release
    the GIL inside jaxlib, a hand-off to the training thread per array.
    """
    if isinstance(tree, jax.Array):  # one array (a separately recorded loss)
        return host_copy(tree)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    first = next((leaf for leaf in leaves if isinstance(leaf, jax.Array)), None)
    if first is not None and any(d.platform != "cpu" for d in first.devices()):
        return jax.device_get(tree)
    host = [host_copy(leaf) if isinstance(leaf, jax.Array) else leaf for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, host)


def _scalar(value: Any) -> float | None:
    kind = type(value)
    if kind is float:
        return value
    if kind is np.ndarray and value.size == 1 and value.dtype.kind in "fiub":
        return float(value.reshape(()))  # the common case, without dtype machinery
    if kind is int or kind is bool:
        return float(value)
    try:
        arr = np.asarray(value)
    except Exception:
        return None
    if arr.size != 1 or arr.dtype.kind not in "fiub":
        return None
    return float(arr.reshape(()).astype(np.float64))
