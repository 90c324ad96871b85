"""The monitor's worker-side logic: materialize, check, alert, fan out to guarded sinks.

Everything here runs on the monitor's writer thread (see ``_worker.py``) except the
counters, which the training thread reads.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from penwatch.schema import Event, RunInfo, StepRecord, find_nonfinite, layout_of, leaf_reports
from penwatch.sinks._base import Sink
from penwatch.telemetry._worker import Item, SinkGuard

logger = logging.getLogger("penwatch.telemetry")

__all__ = ["Core"]


class Core:
    """Worker-side state. Threads reference this, never the Monitor (so it can be GC'd)."""

    def __init__(
        self, info: RunInfo, sinks: Sequence[Sink], alerts: Sequence[Any], max_leaves: int
    ):
        self.info, self.alerts, self.max_leaves = info, list(alerts), max_leaves
        names: dict[str, int] = {}
        self.guards = []
        for sink in sinks:
            base = getattr(sink, "name", None) or type(sink).__name__
            names[base] = names.get(base, 0) + 1
            name = base if names[base] == 1 else f"{base}#{names[base]}"
            self.guards.append(SinkGuard(sink, name))
        self.recorded = self.processed = self.events = self.alert_errors = 0
        self.closed_drops = self.materialize_errors = 0
        self.queue_drops = lambda: 0
        self.pending_error: BaseException | None = None
        self.started = threading.Event()

    def dropped(self) -> dict[str, int]:
        return {
            "queue_full": self.queue_drops(),
            "closed": self.closed_drops,
            "materialize_error": self.materialize_errors,
            "sink_error": sum(g.lost for g in self.guards),
        }

    def start(self) -> None:
        try:
            for guard in self.guards:
                guard.open(self.info)
        finally:
            self.started.set()

    def flush(self) -> None:
        for guard in self.guards:
            guard.call("flush")

    def stop(self) -> None:
        for guard in self.guards:
            guard.close()

    def handle(self, item: Item) -> None:
        if item.error is not None:
            self.materialize_errors += 1
            if self.materialize_errors == 1:
                logger.error(
                    "penwatch monitor: could not read step %r's results (%s); record dropped",
                    item.step,
                    item.error,
                )
            return
        record = self.build(item)
        self.processed += 1
        events = self.evaluate(record)
        trace_id = None
        for guard in self.guards:
            if hasattr(guard.sink, "begin_step"):
                tid = guard.call_value("begin_step", record)
                trace_id = trace_id or tid
        if trace_id:
            record = dataclasses.replace(record, trace_id=trace_id)
        for guard in self.guards:
            for event in events:
                guard.write("write_event", event)
            guard.write("write_step", record)

    def build(self, item: Item) -> StepRecord:
        metrics, loss, step = item.payload
        leaf_tree = metrics.pop("_leaf_nonfinite", None)
        metrics, loss, step = _materialize((metrics, loss, step))
        # The per-leaf counts (two arrays per leaf) are read only when the step's
        # in-step total says a leaf is non-finite, or when no total was given.
        count = metrics.get("_leaf_nonfinite_count")
        if leaf_tree is not None and (count is None or int(count) > 0):
            metrics["_leaf_nonfinite"] = _materialize(leaf_tree)
        values: dict[str, float] = {}
        for key, value in metrics.items():
            if key.startswith("_"):
                continue
            number = _scalar(value)
            if number is not None:
                values[key] = number
        explicit = _scalar(loss) if loss is not None else None
        if explicit is not None and "loss" not in values:
            values["loss"] = explicit
        if explicit is None:
            explicit = values.get("base_loss", values.get("loss"))
        layout = layout_of(values, getattr(item, "penalties", None))
        terms = layout.terms
        kind = item.kind or (
            "train_step"
            if leaf_tree is not None or "base_loss" in metrics or terms
            else "pipeline_compute"
        )
        ready = item.ready_at_ns
        return StepRecord(
            run=self.info.run,
            process=self.info.process,
            step=int(np.asarray(step)),
            pipeline=item.pipeline,
            wall_time=item.wall_time,
            values=values,
            layout=layout,
            loss=explicit,
            duration_seconds=None if ready is None else (ready - item.dispatched_at_ns) / 1e9,
            nonfinite=find_nonfinite(tuple(values.values()), layout),
            leaves=leaf_reports(metrics.get("_leaf_nonfinite"), max_leaves=self.max_leaves),
            kind=kind,
            dispatched_at_ns=item.dispatched_at_ns,
            ready_at_ns=ready,
            dropped=self.dropped(),
        )

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


def _materialize(tree: Any) -> Any:
    """Host copies of a pytree's arrays, in one go.

    On accelerators: one ``jax.device_get`` of the whole tree (all transfers started
    together). On the CPU backend the arrays already live in host memory and
    ``np.asarray`` is a zero-copy view; ``device_get``'s per-array asynchronous copy
    bookkeeping would cost ~20x more worker CPU (measured: 1.2 ms vs 0.08 ms for a
    50-array record), CPU that the training step itself needs.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    first = next((leaf for leaf in leaves if isinstance(leaf, jax.Array)), None)
    if first is not None and any(d.platform != "cpu" for d in first.devices()):
        return jax.device_get(tree)
    host = [np.asarray(leaf) if isinstance(leaf, jax.Array) else leaf for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, host)


def _scalar(value: Any) -> float | None:
    if isinstance(value, float):
        return value
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "fiub":
        return float(value.reshape(()))  # the common case, without dtype machinery
    try:
        arr = np.asarray(value)
    except Exception:
        return None
    if arr.size != 1 or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        return None
    return float(arr.reshape(()).astype(np.float64))
