"""``OpenTelemetry``: one span per recorded step, through the OpenTelemetry *API* only.

penwatch is a library, so it never configures the SDK: with ``tracer_provider=None`` it
uses whatever provider the application installed (a no-op until then). ``penwatch
demo`` configures the SDK with OTLP/HTTP from the standard ``OTEL_*`` variables.

Each record becomes a span ``penwatch.train_step`` (a train step's metrics) or
``penwatch.pipeline.compute`` spanning the step's device time: from
``max(dispatch, previous step ready)`` to when the worker saw its results ready
(SPEC section 6). The monitor opens the span before
fanning out (:meth:`OpenTelemetry.begin_step`), so its trace id reaches the Prometheus
histogram as an exemplar and alert events land on it. An SDK tracer's processors get
each span whole when its record is written (:mod:`penwatch.sinks._spans`); any other
tracer goes through ``start_span`` and ``end``.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from penwatch import _checks
from penwatch._version import __version__
from penwatch.schema import Event, RunInfo, RunStatus, StepRecord, describe
from penwatch.sinks._base import Sink
from penwatch.sinks._spans import FinishedSpans, finished_spans

__all__ = ["SPAN_ATTRIBUTES", "SPAN_NAMES", "OpenTelemetry"]

logger = logging.getLogger("penwatch.sinks")

SPAN_NAMES = {"train_step": "penwatch.train_step", "pipeline_compute": "penwatch.pipeline.compute"}
"""Record kind -> span name."""

SPAN_ATTRIBUTES: dict[str, tuple[str, ...] | None] = {
    "penalties": ("value", "weighted"),
    "all": None,
}
"""``attributes`` option -> the per-penalty quantities a span carries (None: every
metric of the record, penalties, gradient terms and the rest)."""

IDENTITY_ATTRIBUTES = 6
"""Span attributes a record always gets: run, process, step, pipeline, loss, duration."""


def _attr(value: Any) -> Any:
    """An OpenTelemetry attribute value (primitives as is, the rest as JSON)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return [float(v) for v in value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return json.dumps(value, default=str)


def _attributes(prefix: str, items: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{k}": _attr(v) for k, v in items.items() if v is not None}


class OpenTelemetry(Sink):
    """Writes each record as a span, non-finite values and alerts as span events.

    Span attributes: ``penwatch.run``, ``penwatch.process``, ``penwatch.step``,
    ``penwatch.pipeline``, ``penwatch.loss``, ``penwatch.duration_seconds``, and per
    penalty ``penwatch.penalty.<name>.value`` and ``.weighted``. With
    ``attributes="all"``, every metric of the record: per penalty also ``weight``,
    ``grad_norm``, ``finite``, per gradient term ``penwatch.term.<term>.<quantity>``
    (``param_grad_norm``, ``grad_share``, ``grad_cosine``, ...) and every other metric as
    ``penwatch.metric.<key>``. A record with non-finite values gets a
    ``penwatch.nonfinite`` event and status ERROR (the description names the first
    offender); alerts add ``penwatch.alert`` events.

    A span holds at most ``max_attributes``: past it the metrics last in the record are
    left out (logged once per key layout) and the six above always kept. The SDK's
    own limit (``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT``, 128 by default) drops a span's
    *oldest* attributes with a warning per attribute and span; keep ``max_attributes``
    at or below it.

    With ``every=N``, only steps that are multiples of N get a span, and every record
    with a non-finite value or leaf (whatever its step): a lighter trace for short
    steps that still shows each failure, unlike a ratio sampler. Records without a span
    carry no trace id; alerts on their steps become ``penwatch.event`` spans.

    Args:
      tracer_provider: an SDK ``TracerProvider``; None uses the global provider.
      attributes: ``"penalties"`` (per-penalty values, as above) or ``"all"``.
      max_attributes: the most attributes a span gets (≥ 6).
      every: trace every N-th step (and every non-finite record).
    """

    name = "OpenTelemetry"

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        attributes: Literal["penalties", "all"] = "penalties",
        max_attributes: int = 128,
        every: int = 1,
    ) -> None:
        fn = "penwatch.sinks.OpenTelemetry"
        self.every = _checks.check_int(fn, "every", every, min=1)
        self.attributes = _checks.check_choice(fn, "attributes", attributes, SPAN_ATTRIBUTES)
        self.max_attributes = _checks.check_int(
            fn, "max_attributes", max_attributes, min=IDENTITY_ATTRIBUTES
        )
        self.tracer_provider = tracer_provider
        # span factory: the SDK tracer's finished spans, or the tracer itself
        self._spans: trace.Tracer | FinishedSpans | None = None
        # spans begun on the dispatch thread, ended by write_step on this sink's thread
        self._open: collections.OrderedDict[tuple[str, int], trace.Span] = collections.OrderedDict()
        self._open_lock = threading.Lock()
        # attribute name -> metric key, per layout of a record's keys (they rarely change)
        self._plans: dict[tuple[Any, ...], tuple[tuple[str, str], ...]] = {}
        self._sampled = True  # whether the last span was recording

    def open(self, info: RunInfo) -> None:
        tracer = trace.get_tracer("penwatch", __version__, tracer_provider=self.tracer_provider)
        self._spans = finished_spans(tracer) or tracer

    def _start(self, record: StepRecord) -> trace.Span:
        if self._spans is None:
            raise RuntimeError("penwatch.sinks.OpenTelemetry: used before open")
        start = record.started_at_ns or int(record.wall_time * 1e9)
        # The step's values go in at the start (the sampler sees them, as start_span's
        # would; the SDK's live span validates attributes on every call: one pass
        # instead of two) when the last span was sampled, so that an unconfigured
        # (no-op) or unsampling tracer costs no attribute building. The record's
        # identity goes in last: an SDK over its attribute limit drops the oldest.
        attributes = self._step_attributes(record) if self._sampled else {}
        attributes["penwatch.run"] = record.run
        attributes["penwatch.process"] = record.process
        attributes["penwatch.step"] = record.step
        attributes["penwatch.pipeline"] = record.pipeline
        span = self._spans.start_span(
            SPAN_NAMES.get(record.kind, "penwatch.pipeline.compute"),
            start_time=start,
            attributes=attributes,
        )
        sampled = span.is_recording()
        if sampled and not self._sampled:
            span.set_attributes(self._step_attributes(record))
        self._sampled = sampled
        return span

    def _traced(self, record: StepRecord) -> bool:
        """Whether the record gets a span: its step is on the ``every`` grid, or it holds
        a non-finite value or leaf."""
        return record.step % self.every == 0 or record.has_nonfinite

    def begin_step(self, record: StepRecord) -> int | None:
        """Open the record's span; returns its trace id (None when tracing is off or the
        record gets no span)."""
        if not self._traced(record):
            return None
        span = self._start(record)
        with self._open_lock:
            old = self._open.pop((record.pipeline, record.step), None)
            self._open[(record.pipeline, record.step)] = span
            while len(self._open) > self.max_pending:  # records this sink dropped
                self._open.popitem(last=False)[1].end()
        if old is not None:
            old.end()
        ctx = span.get_span_context()
        return ctx.trace_id if ctx.is_valid and span.is_recording() else None

    def write_event(self, event: Event) -> None:
        attrs = _attributes("penwatch.alert.", event.attributes)
        attrs.update(
            {
                "penwatch.alert.name": event.name,
                "penwatch.alert.kind": event.kind,
                "penwatch.alert.severity": event.severity,
                "penwatch.alert.message": event.message,
            }
        )
        stamp = int(event.wall_time * 1e9)
        key = (str(event.attributes.get("pipeline", "")), event.step)
        with self._open_lock:
            span = self._open.get(key)
        if span is not None:
            span.add_event("penwatch.alert", attrs, timestamp=stamp)
            return
        if self._spans is None:
            raise RuntimeError("penwatch.sinks.OpenTelemetry: used before open")
        span = self._spans.start_span(
            "penwatch.event",
            start_time=stamp,
            attributes={"penwatch.run": event.run, "penwatch.step": event.step},
        )
        span.add_event("penwatch.alert", attrs, timestamp=stamp)
        span.end(end_time=stamp)

    def write_step(self, record: StepRecord) -> None:
        with self._open_lock:
            span = self._open.pop((record.pipeline, record.step), None)
        if span is None:
            if not self._traced(record):
                return
            span = self._start(record)
        try:
            if span.is_recording() and record.has_nonfinite:
                span.add_event(
                    "penwatch.nonfinite",
                    {
                        "penwatch.nonfinite.metrics": [nf.key for nf in record.nonfinite],
                        "penwatch.nonfinite.kinds": [nf.kind for nf in record.nonfinite],
                        "penwatch.nonfinite.first": (
                            record.nonfinite[0].key if record.nonfinite else ""
                        ),
                        "penwatch.nonfinite.leaves": [
                            f"{lf.tree}{lf.path}" for lf in record.leaves
                        ],
                    },
                    timestamp=record.ready_at_ns,
                )
                span.set_status(Status(StatusCode.ERROR, describe(record)))
        finally:
            span.end(end_time=record.ready_at_ns or time.time_ns())

    def close(self, *, status: RunStatus = "finished") -> None:
        """End spans begun for records this sink never wrote."""
        with self._open_lock:
            spans, self._open = list(self._open.values()), collections.OrderedDict()
        for span in spans:
            span.end()

    def _step_attributes(self, record: StepRecord) -> dict[str, Any]:
        values = record.values
        plan = self._plans.get(record.layout)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[record.layout] = self._attribute_plan(record)
        attrs: dict[str, Any] = {name: values[key] for name, key in plan}
        if record.loss is not None:
            attrs["penwatch.loss"] = record.loss
        if record.duration_seconds is not None:
            attrs["penwatch.duration_seconds"] = record.duration_seconds
        return attrs

    def _attribute_plan(self, record: StepRecord) -> tuple[tuple[str, str], ...]:
        """(span attribute, metric key) pairs for a record's keys, in the record's order,
        as many as ``max_attributes`` leaves room for."""
        quantities = SPAN_ATTRIBUTES[self.attributes]
        plan: list[tuple[str, str]] = []
        for slot in record.layout.slots:
            if slot.scope == "penalty":
                if quantities is None or slot.quantity in quantities:
                    plan.append((f"penwatch.penalty.{slot.name}.{slot.quantity}", slot.key))
            elif quantities is not None:
                continue
            elif slot.scope == "term":
                plan.append((f"penwatch.term.{slot.name}.{slot.quantity}", slot.key))
            else:
                plan.append((f"penwatch.metric.{slot.key}", slot.key))
        room = self.max_attributes - IDENTITY_ATTRIBUTES
        if len(plan) > room:
            logger.warning(
                "penwatch sink %s: spans carry %d of the record's %d metrics "
                "(attributes=%r, max_attributes=%d; left out from %r on)",
                self.name, room, len(plan), self.attributes, self.max_attributes,
                plan[room][1],
            )  # fmt: skip
        return tuple(plan[:room])


_MAX_PLANS = 64
