"""Finished spans for the OpenTelemetry SDK: a step's span built as data, handed over whole.

A step's span is known whole once its record is: its start (the device time's start), its
end (results ready), its attributes, its events. The SDK's own span object
(``Tracer.start_span`` ... ``end``) pays for a live span on every step: locks, an
attribute re-validated per value, a copy at the end, about 20 µs in a warm loop and three
to four times that beside a busy training step, where each record's work starts from cold
caches. :class:`FinishedSpans` does what ``start_span`` does with the SDK tracer's own
parts (its sampler, id generator, resource, span limits) and, at ``end``, hands the span
to the tracer's span processors as a ``ReadableSpan``, the form every processor and
exporter receives: out-of-band spans in the sense of OTEP 0004.

Differences from the SDK's span, all unused by penwatch's sink: no ``on_start`` call to
the processors (none of the SDK's own act on it), no ``_on_ending`` hook, no parent (a
step's span is a root), and none of the SDK's self-metrics of started spans.
:func:`finished_spans` returns None for a tracer without those parts (the API's no-op
tracer, a proxy, another SDK, or none installed), which then goes through ``start_span``.

References: OpenTelemetry Python SDK, ``opentelemetry.sdk.trace.Tracer.start_span`` and
``Span.end``; OTEP 0004 (out-of-band spans).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanLimits, Tracer
    from opentelemetry.sdk.util import BoundedList

__all__ = ["FinishedSpans", "finished_spans"]

_PRIMITIVES = (bool, int, float, str)

# Shared, never changed: a status and trace flags of its own would give every span in
# flight two more objects for the garbage collector to track (docs/benchmarks.md, "The
# garbage collector": the objects a monitored loop holds set how often it runs)
_UNSET = Status(StatusCode.UNSET)
_FLAGS = {flags: TraceFlags(flags) for flags in range(256)}


def finished_spans(tracer: Any) -> FinishedSpans | None:
    """A :class:`FinishedSpans` over an SDK tracer; None for any other tracer.

    The SDK (the ``otlp`` extra) is never imported here: an SDK tracer exists only once
    its module is loaded, so ``import penwatch`` stays free of it."""
    sdk = sys.modules.get("opentelemetry.sdk.trace")
    if sdk is None or not isinstance(tracer, sdk.Tracer):
        return None
    limits = getattr(tracer, "_span_limits", None)
    scope = getattr(tracer, "_instrumentation_scope", None)
    if not isinstance(limits, sdk.SpanLimits) or scope is None:
        return None
    return FinishedSpans(tracer, sdk=sdk, limits=limits, scope=scope)


class FinishedSpans:
    """``start_span`` for one SDK tracer, with spans that reach its processors at ``end``."""

    def __init__(self, tracer: Tracer, *, sdk: ModuleType, limits: SpanLimits, scope: Any) -> None:
        self.tracer = tracer
        self.sdk = sdk  # opentelemetry.sdk.trace
        self.limits = limits
        self.scope = scope
        enabled = getattr(tracer, "_is_enabled", None)  # the SDK's tracer configurator
        self._enabled = enabled if callable(enabled) else (lambda: True)
        self._random_ids = bool(tracer.id_generator.is_trace_id_random())

    def start_span(
        self, name: str, *, start_time: int, attributes: Mapping[str, Any]
    ) -> trace.Span | RecordSpan:
        """A root span, sampled by the tracer's sampler (which sees ``attributes``)."""
        tracer = self.tracer
        if not self._enabled():
            return trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
        trace_id = tracer.id_generator.generate_trace_id()
        sampling = tracer.sampler.should_sample(
            None, trace_id, name, SpanKind.INTERNAL, attributes, ()
        )
        flags = TraceFlags.SAMPLED if sampling.decision.is_sampled() else TraceFlags.DEFAULT
        if self._random_ids:
            flags |= TraceFlags.RANDOM_TRACE_ID
        context = SpanContext(
            trace_id,
            tracer.id_generator.generate_span_id(),
            is_remote=False,
            trace_flags=_FLAGS[flags],
            trace_state=sampling.trace_state,
        )
        if not sampling.decision.is_recording():
            return trace.NonRecordingSpan(context)
        return RecordSpan(self, name, context, start_time, dict(sampling.attributes))

    def attributes(self, attributes: dict[str, Any]) -> Mapping[str, Any]:
        """A span's attributes under the span limits: the plain dict when none binds
        (penwatch's values are primitives), else the SDK's bounded mapping."""
        limits = self.limits
        cap = limits.max_span_attributes
        if (
            (cap is None or len(attributes) <= cap)
            and limits.max_span_attribute_length is None
            and all(type(v) in _PRIMITIVES for v in attributes.values())
        ):
            return attributes
        return BoundedAttributes(
            cap, attributes, immutable=True, max_value_len=limits.max_span_attribute_length
        )


class RecordSpan:
    """A recording span as plain data; ``end`` hands it to the processors whole.

    Implements the part of ``opentelemetry.trace.Span`` the OpenTelemetry sink uses.
    Not locked: the sink's thread adds a span's events and ends it; the dispatch thread
    ends only spans of records the sink dropped, once they left the sink's table.
    """

    __slots__ = ("_attributes", "_context", "_end", "_events", "_name", "_spans", "_start",
                 "_status")  # fmt: skip

    def __init__(
        self,
        spans: FinishedSpans,
        name: str,
        context: SpanContext,
        start_time: int,
        attributes: dict[str, Any],
    ) -> None:
        self._spans = spans
        self._name = name
        self._context = context
        self._start = start_time
        self._attributes = attributes
        self._events: BoundedList | tuple[()] = ()
        self._status = _UNSET
        self._end: int | None = None

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end is None

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self._end is None:
            self._attributes.update(attributes)

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        if self._end is not None:
            return
        from opentelemetry.sdk.util import BoundedList  # loaded with the SDK's tracer

        limits = self._spans.limits
        if not self._events:
            self._events = BoundedList(limits.max_events)
        self._events.append(
            self._spans.sdk.Event(
                name,
                BoundedAttributes(
                    limits.max_event_attributes,
                    attributes,
                    max_value_len=limits.max_attribute_length,
                    immutable=True,
                ),
                timestamp if timestamp is not None else time.time_ns(),
            )
        )

    def set_status(self, status: Status) -> None:
        if self._end is None and status.status_code is not StatusCode.UNSET:
            self._status = status

    def end(self, end_time: int | None = None) -> None:
        if self._end is not None:
            return
        self._end = end_time if end_time is not None else time.time_ns()
        spans = self._spans
        tracer = spans.tracer
        tracer.span_processor.on_end(
            spans.sdk.ReadableSpan(
                name=self._name,
                context=self._context,
                resource=tracer.resource,
                attributes=spans.attributes(self._attributes),
                events=self._events,
                kind=SpanKind.INTERNAL,
                status=self._status,
                start_time=self._start,
                end_time=self._end,
                instrumentation_info=tracer.instrumentation_info,
                instrumentation_scope=spans.scope,
            )
        )
