"""pw.sinks.OpenTelemetry: spans with the SDK's in-memory exporter and over real OTLP/HTTP."""

from __future__ import annotations

import gzip
import http.server
import logging
import threading
import zlib
from typing import ClassVar

import jax.numpy as jnp
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, Sampler, SamplingResult
from opentelemetry.trace import StatusCode

import penwatch as pw
from penwatch._demo import _train
from penwatch._demo._tracing import configure_tracing, tracing_requested
from penwatch.schema import penalty_key
from penwatch.sinks import _otel, _spans

STEPS, NAN_AT = 12, 4


@pytest.fixture
def memory():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.mark.parametrize("max_plans", [64, 1], ids=["cached", "evicting"])
def test_train_step_spans_attributes_times_and_nan(memory, monkeypatch, max_plans):
    # diagnostics steps add keys: the attribute plans per key layout must follow them
    monkeypatch.setattr(_otel, "_MAX_PLANS", max_plans)
    provider, exporter = memory
    records: list = []
    monitor = pw.Monitor(
        "otel",
        sinks=[
            pw.sinks.OpenTelemetry(provider, attributes="all"),
            pw.sinks.Callback(records.append),
        ],
        alerts=[pw.alerts.NonFinite()],
    )
    _train.run(monitor, steps=STEPS, inject_nan_at=NAN_AT)
    monitor.close()
    spans = exporter.get_finished_spans()
    assert len(spans) == STEPS
    by_step = {s.attributes["penwatch.step"]: s for s in spans}
    for rec in records:
        span = by_step[rec.step]
        assert span.name == "penwatch.train_step"
        assert span.attributes["penwatch.run"] == "otel"
        assert span.attributes["penwatch.pipeline"] == "demo"
        assert span.start_time == rec.started_at_ns and span.end_time == rec.ready_at_ns
        assert span.start_time >= rec.dispatched_at_ns  # device time, not queueing
        assert (span.end_time - span.start_time) / 1e9 == pytest.approx(rec.duration_seconds)
        assert span.attributes["penwatch.penalty.entropy.value"] == pytest.approx(
            rec.values["entropy"], nan_ok=True
        )
        assert span.attributes["penwatch.penalty.l2.weighted"] == pytest.approx(
            rec.values["l2_weighted"]
        )
        assert rec.trace_id == span.context.trace_id
        # every recorded value is an attribute, once (NaN compares as its text)
        prefixes = ("penwatch.penalty.", "penwatch.term.", "penwatch.metric.")
        carried = [v for k, v in span.attributes.items() if k.startswith(prefixes)]
        assert sorted(map(repr, carried)) == sorted(map(repr, rec.values.values()))
        if rec.terms:
            assert "penwatch.term.orthogonality.grad_share" in span.attributes
    bad = by_step[NAN_AT]
    assert bad.status.status_code == StatusCode.ERROR
    assert "orthogonality_weight" in bad.status.description
    names = [e.name for e in bad.events]
    assert names.count("penwatch.nonfinite") == 1 and names.count("penwatch.alert") == 1
    nf = next(e for e in bad.events if e.name == "penwatch.nonfinite")
    assert nf.attributes["penwatch.nonfinite.first"] == "orthogonality_weight"
    assert "grads['hidden']['w']" in nf.attributes["penwatch.nonfinite.leaves"]
    alert = next(e for e in bad.events if e.name == "penwatch.alert")
    assert alert.attributes["penwatch.alert.name"] == "NonFinite"
    ok = [s for s in spans if s.attributes["penwatch.step"] != NAN_AT]
    assert all(s.status.status_code == StatusCode.UNSET and not s.events for s in ok)


def test_spans_carry_the_penalty_values_by_default(memory):
    provider, exporter = memory
    records: list = []
    sinks = [pw.sinks.OpenTelemetry(provider), pw.sinks.Callback(records.append)]
    with pw.Monitor("values", sinks=sinks, alerts=[]) as monitor:
        _train.run(monitor, steps=3)
    spans = {s.attributes["penwatch.step"]: s for s in exporter.get_finished_spans()}
    assert len(spans) == 3
    for record in records:
        expected = {
            "penwatch.run": "values",
            "penwatch.process": 0,
            "penwatch.step": record.step,
            "penwatch.pipeline": "demo",
            "penwatch.loss": record.loss,
            "penwatch.duration_seconds": record.duration_seconds,
        }
        for penalty in record.penalty_values:
            expected[f"penwatch.penalty.{penalty.name}.value"] = penalty.value
            expected[f"penwatch.penalty.{penalty.name}.weighted"] = penalty.weighted
        assert dict(spans[record.step].attributes) == pytest.approx(expected)
        assert len(expected) == 6 + 2 * len(record.penalties) >= 12


QUANTITIES = ("value", "weighted", "weight", "grad_norm", "finite")


def _many_penalties(count: int) -> dict[str, float]:
    record = {}
    for i in range(count):
        for quantity in QUANTITIES:
            record[penalty_key(f"p{i}", quantity)] = float(i)
    record["total"] = float(count)
    return record


def test_a_span_never_passes_max_attributes_and_keeps_its_identity(memory, caplog):
    # 32 penalties with every quantity are 161 metrics: past the SDK's 128 attributes,
    # whose eviction of the oldest took penwatch.run and penwatch.step away, with a
    # warning per attribute per step
    provider, exporter = memory
    record = _many_penalties(32)
    with caplog.at_level(logging.WARNING):
        sink = pw.sinks.OpenTelemetry(provider, attributes="all")
        with pw.Monitor("many", sinks=[sink], alerts=[]) as monitor:
            for step in range(3):
                monitor.record(step, record)
    spans = exporter.get_finished_spans()
    assert len(spans) == 3
    names = [f"penwatch.penalty.p{i}.{q}" for i in range(32) for q in QUANTITIES]
    for step, span in enumerate(sorted(spans, key=lambda s: s.attributes["penwatch.step"])):
        assert len(span.attributes) <= 128 and span.dropped_attributes == 0
        assert span.attributes["penwatch.run"] == "many"
        assert span.attributes["penwatch.step"] == step
        assert span.attributes["penwatch.pipeline"] == "default"
        assert "penwatch.duration_seconds" in span.attributes
        # the record's first 122 metrics (128 less six for the identity), in its order
        carried = [k for k in span.attributes if k.startswith("penwatch.penalty.")]
        assert carried == names[:122]
    capped = [r for r in caplog.records if "max_attributes=128" in r.getMessage()]
    assert len(capped) == 1  # once per key layout
    assert "122 of the record's 161 metrics (attributes='all'" in capped[0].getMessage()
    assert not [r for r in caplog.records if "Attributes dict is full" in r.getMessage()]
    # the default, two quantities per penalty, fits: 64 and the identity (no loss here)
    exporter.clear()
    with pw.Monitor("many", sinks=[pw.sinks.OpenTelemetry(provider)], alerts=[]) as monitor:
        monitor.record(0, record)
    (span,) = exporter.get_finished_spans()
    assert len(span.attributes) == 64 + 5 and span.attributes["penwatch.penalty.p31.weighted"] == 31


@pytest.mark.parametrize(("penalties", "capped"), [(61, False), (62, True)])
def test_the_default_fits_61_penalties_in_128_attributes(memory, caplog, penalties, capped):
    provider, exporter = memory
    record = {"loss": 1.0, **_many_penalties(penalties)}  # every identity attribute
    sink = pw.sinks.OpenTelemetry(provider)
    with caplog.at_level(logging.WARNING, "penwatch.sinks"), pw.Monitor("fit", sinks=[sink]) as m:
        m.record(0, record)
    (span,) = exporter.get_finished_spans()
    assert len(span.attributes) == min(2 * penalties + 6, 128)
    last = f"penwatch.penalty.p{penalties - 1}.weighted"
    assert (last not in span.attributes) is capped
    assert any("max_attributes=128" in r.getMessage() for r in caplog.records) is capped


class _FiresAt(pw.alerts.Alert):
    name = "FiresAt"

    def __init__(self, step: int) -> None:
        self.step = step

    def evaluate(self, record):
        return [self._event(record, "fired")] if record.step == self.step else []


def test_every_nth_step_is_traced_and_every_non_finite_record(memory):
    provider, exporter = memory
    records: list = []
    sinks = [pw.sinks.OpenTelemetry(provider, every=5), pw.sinks.Callback(records.append)]
    alerts = [pw.alerts.NonFinite(), _FiresAt(7)]  # NonFinite's on the spans; step 7: none
    with pw.Monitor("every", sinks=sinks, alerts=alerts) as monitor:
        for step in range(12):
            value = float("nan") if step in (3, 10) else float(step)
            monitor.record(step, {"l1": value, "l1_weight": 1.0, "l1_weighted": value})
    finished = exporter.get_finished_spans()
    (alone,) = [s for s in finished if s.name == "penwatch.event"]
    assert alone.attributes["penwatch.step"] == 7
    assert alone.events[0].attributes["penwatch.alert.name"] == "FiresAt"
    spans = {s.attributes["penwatch.step"]: s for s in finished if s is not alone}
    assert sorted(spans) == [0, 3, 5, 10]
    for step in (3, 10):
        assert spans[step].status.status_code == StatusCode.ERROR
        assert [e.name for e in spans[step].events] == ["penwatch.alert", "penwatch.nonfinite"]
    assert spans[5].status.status_code == StatusCode.UNSET
    traced = {r.step: r.trace_id for r in records if r.trace_id is not None}
    assert traced == {step: span.context.trace_id for step, span in spans.items()}
    assert len(records) == 12


def test_an_sdk_limit_below_max_attributes_evicts_metrics_not_the_identity():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=SpanLimits(max_span_attributes=20))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with pw.Monitor("tight", sinks=[pw.sinks.OpenTelemetry(provider)], alerts=[]) as monitor:
        monitor.record(7, _many_penalties(12))
    (span,) = exporter.get_finished_spans()
    assert len(span.attributes) == 20 and span.dropped_attributes == 2 * 12 + 5 - 20
    assert span.attributes["penwatch.run"] == "tight" and span.attributes["penwatch.step"] == 7
    provider.shutdown()


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("attributes", "some", "one of 'penalties', 'all'"),
        ("attributes", None, "one of 'penalties', 'all'"),
        ("max_attributes", 5, "an integer >= 6"),
        ("max_attributes", 64.0, "an integer >= 6"),
        ("every", 0, "an integer >= 1"),
        ("every", 2.5, "an integer >= 1"),
    ],
)
def test_bad_span_options_are_refused(option, value, allowed):
    with pytest.raises(ValueError, match=f"OpenTelemetry: option '{option}' must be {allowed}"):
        pw.sinks.OpenTelemetry(**{option: value})


def test_pipeline_compute_span(memory):
    provider, exporter = memory
    with pw.Monitor("inst", sinks=[pw.sinks.OpenTelemetry(provider)], alerts=[]) as monitor:
        pipe = pw.instrument(pw.pipeline([("l1", 0.5)]), monitor)
        pipe.compute(jnp.arange(3.0))
    (span,) = exporter.get_finished_spans()
    assert span.name == "penwatch.pipeline.compute"
    assert span.attributes["penwatch.penalty.l1.value"] == 3.0
    assert span.attributes["penwatch.penalty.l1.weighted"] == 1.5
    assert span.end_time >= span.start_time


def test_global_provider_is_a_no_op_until_configured():
    # The library never configures the SDK: with the default (proxy/no-op) provider the
    # sink works and produces no trace ids.
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    records: list = []
    with pw.Monitor(
        "noop", sinks=[pw.sinks.OpenTelemetry(), pw.sinks.Callback(records.append)], alerts=[]
    ) as monitor:
        monitor.record(0, {"l1": 1.0, "l1_weight": 1.0})
    assert records[0].trace_id is None
    assert monitor.sink_errors["OpenTelemetry"] == 0


class _EveryOther(Sampler):
    """Samples steps 0, 2, 4, ...: spans alternate between recorded and not."""

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                      links=None, trace_state=None):  # fmt: skip
        if attributes["penwatch.step"] % 2:
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "every other step"


def test_sampled_spans_carry_every_value_when_sampling_alternates():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=_EveryOther())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sinks = [pw.sinks.OpenTelemetry(provider, attributes="all")]
    with pw.Monitor("sampled", sinks=sinks, alerts=[]) as monitor:
        for step in range(6):
            monitor.record(step, {"l1": float(step), "l1_weight": 0.5, "total": 0.5 * step})
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.attributes["penwatch.step"])
    assert [s.attributes["penwatch.step"] for s in spans] == [0, 2, 4]
    for span in spans:
        step = span.attributes["penwatch.step"]
        assert span.attributes["penwatch.penalty.l1.value"] == float(step)
        assert span.attributes["penwatch.metric.total"] == 0.5 * step
    provider.shutdown()


def test_no_attributes_are_built_for_a_span_after_a_dropped_one(monkeypatch):
    # docs/telemetry.md: sampling spans away saves building their attributes (only the
    # first span, before the sink knows the sampler drops, builds them).
    built: list[int] = []
    build = _otel.OpenTelemetry._step_attributes

    def counting(self, record):
        built.append(record.step)
        return build(self, record)

    monkeypatch.setattr(_otel.OpenTelemetry, "_step_attributes", counting)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    records: list = []
    sinks = [pw.sinks.OpenTelemetry(provider), pw.sinks.Callback(records.append)]
    with pw.Monitor("dropped", sinks=sinks, alerts=[]) as monitor:
        for step in range(5):
            monitor.record(step, {"l1": float(step), "l1_weight": 0.5})
    assert built == [0]
    assert exporter.get_finished_spans() == ()
    assert [r.trace_id for r in records] == [None] * 5
    provider.shutdown()


class _Receiver(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        type(self).requests.append((self.path, request))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_spans_over_real_otlp_http(monkeypatch):
    _Receiver.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # Exactly how the CLI does it: the exporter reads the standard OTEL_* variables.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
        assert tracing_requested()
        provider, counting = configure_tracing()
        with pw.Monitor("otlp", sinks=[pw.sinks.OpenTelemetry(provider)]) as monitor:
            _train.run(monitor, steps=6, inject_nan_at=2)
        assert provider.force_flush(10_000)
        provider.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    assert counting.exported == 6 and counting.failed == 0
    spans = []
    for path, request in _Receiver.requests:
        assert path == "/v1/traces"
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            assert resource["service.name"] == "penwatch"
            for ss in rs.scope_spans:
                assert ss.scope.name == "penwatch" and ss.scope.version == pw.__version__
                spans.extend(ss.spans)
    assert sorted(s.name for s in spans) == ["penwatch.train_step"] * 6
    attrs = {s.name + str(i): {a.key: a.value for a in s.attributes} for i, s in enumerate(spans)}
    steps = sorted(a["penwatch.step"].int_value for a in attrs.values())
    assert steps == list(range(6))
    bad = next(
        s
        for s in spans
        if any(a.key == "penwatch.step" and a.value.int_value == 2 for a in s.attributes)
    )
    assert bad.status.code == 2  # STATUS_CODE_ERROR
    assert {e.name for e in bad.events} == {"penwatch.nonfinite", "penwatch.alert"}


def test_configure_tracing_only_when_asked(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert configure_tracing() is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    assert configure_tracing() is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "trainer-7")
    provider, _ = configure_tracing(exporter=InMemorySpanExporter())
    assert provider.resource.attributes["service.name"] == "trainer-7"
    provider.shutdown()
    _ = OTLPSpanExporter  # the exporter class the CLI uses is importable


def test_a_record_with_its_trace_id_equals_the_dataclass_replacement():
    import dataclasses

    from penwatch.schema import StepRecord, layout_of

    values = {"l1": 1.0, "l1_weight": 0.5, "l1_weighted": 0.5, "total": 0.5}
    record = StepRecord(run="r", process=0, step=3, pipeline="p", wall_time=1.0,
                        values=values, layout=layout_of(values), loss=2.0)  # fmt: skip
    traced = record.with_trace_id(7)
    assert traced == dataclasses.replace(record, trace_id=7)
    assert type(traced) is StepRecord and traced.trace_id == 7 and record.trace_id is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        traced.trace_id = 8  # type: ignore[misc]


def test_a_batch_keeps_each_alert_before_its_record_and_on_its_span(memory, monkeypatch):
    """The dispatcher takes a batch one phase at a time (build, alerts, spans); every
    sink still sees each step's events just before its record, each record carries its
    own span's trace id, and an alert lands on the span of the step that fired it."""
    from penwatch.schema import Event
    from penwatch.telemetry import _intake

    monkeypatch.setattr(_intake, "DISPATCH_DELAY", 0.5)  # the steps below: one batch
    provider, exporter = memory
    seen: list = []
    sink = pw.sinks.Callback(seen.append, on_event=seen.append)
    with pw.Monitor("batch", sinks=[pw.sinks.OpenTelemetry(provider), sink]) as monitor:
        for step in range(8):
            value = float("nan") if step in (3, 6) else 0.5 * step
            monitor.record(step, {"l1": value, "l1_weight": 1.0, "l1_weighted": value})
    kinds = [("event" if isinstance(item, Event) else "record", item.step) for item in seen]
    assert kinds == [("record", 0), ("record", 1), ("record", 2), ("event", 3),
                     ("record", 3), ("record", 4), ("record", 5), ("event", 6),
                     ("record", 6), ("record", 7)]  # fmt: skip
    spans = {s.attributes["penwatch.step"]: s for s in exporter.get_finished_spans()}
    records = [item for item in seen if not isinstance(item, Event)]
    assert len({r.trace_id for r in records}) == 8
    for record in records:
        assert record.trace_id == spans[record.step].context.trace_id
    for step in (3, 6):
        assert [e.name for e in spans[step].events] == ["penwatch.alert", "penwatch.nonfinite"]
    assert not any(spans[step].events for step in (0, 1, 2, 4, 5, 7))


class _Tagging(Sampler):
    """Samples every span and adds an attribute of its own, as samplers may."""

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                      links=None, trace_state=None):  # fmt: skip
        return SamplingResult(Decision.RECORD_AND_SAMPLE, {**attributes, "sampler.tag": "kept"})

    def get_description(self) -> str:
        return "tagging"


def _spans_of_a_run(limits, sampler, *, finished: bool, monkeypatch) -> list:
    """The demo's run (a NaN at step 4, its alert) traced through one span path."""
    if not finished:
        monkeypatch.setattr(_otel, "finished_spans", lambda tracer: None)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=limits, sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sink = pw.sinks.OpenTelemetry(provider, attributes="all")
    with pw.Monitor("paths", sinks=[sink], alerts=[pw.alerts.NonFinite()]) as monitor:
        assert isinstance(sink._spans, _spans.FinishedSpans) is finished
        _train.run(monitor, steps=6, inject_nan_at=NAN_AT)
    monkeypatch.undo()
    provider.shutdown()
    return sorted(exporter.get_finished_spans(), key=lambda s: s.attributes.get("penwatch.step"))


def _span_fields(span) -> dict:
    """What an exporter reads from a span, less its ids, times and device time."""
    timing = "penwatch.duration_seconds"
    return {
        "name": span.name,
        "kind": span.kind,
        "parent": span.parent,
        "flags": span.context.trace_flags,
        "attributes": {k: repr(v) for k, v in span.attributes.items() if k != timing},
        "attribute order": [k for k in span.attributes if k != timing],
        "dropped": span.dropped_attributes,
        "events": [(e.name, dict(e.attributes)) for e in span.events],
        "dropped events": span.dropped_events,
        "status": (span.status.status_code, span.status.description),
        "resource": span.resource.attributes,
        "scope": span.instrumentation_scope,
        "valid": span.context.is_valid and span.end_time >= span.start_time,
    }


TIGHT = SpanLimits(
    max_span_attributes=20, max_span_attribute_length=3, max_events=1, max_event_attributes=2
)


@pytest.mark.parametrize(
    ("limits", "sampler"),
    [
        (None, None),
        (TIGHT, None),
        (None, _Tagging()),
    ],
    ids=["defaults", "tight-limits", "sampler-attributes"],
)
def test_finished_spans_export_what_the_sdk_span_exports(limits, sampler, monkeypatch):
    # The sink hands an SDK tracer's processors finished spans instead of driving the
    # SDK's live span object (penwatch/sinks/_spans.py): whatever the span limits and
    # the sampler, exporters must receive the same spans either way.
    fast = _spans_of_a_run(limits, sampler, finished=True, monkeypatch=monkeypatch)
    slow = _spans_of_a_run(limits, sampler, finished=False, monkeypatch=monkeypatch)
    assert len(fast) == len(slow) == 6
    for a, b in zip(fast, slow, strict=True):
        assert _span_fields(a) == _span_fields(b)
    if limits is not None:  # the limits bound: strings cut, attributes and events dropped
        assert all(len(s.attributes) == 20 and s.dropped_attributes > 0 for s in fast)
        assert fast[0].attributes["penwatch.run"] == "pat"
        assert len(fast[NAN_AT].events) == 1 and fast[NAN_AT].dropped_events == 1
    if sampler is not None:
        assert all(s.attributes["sampler.tag"] == "kept" for s in fast)


def test_spans_of_other_tracers_go_through_start_span():
    from opentelemetry.trace import NoOpTracer

    sdk_tracer = TracerProvider().get_tracer("penwatch")
    assert isinstance(_spans.finished_spans(sdk_tracer), _spans.FinishedSpans)
    assert _spans.finished_spans(NoOpTracer()) is None
    assert _spans.finished_spans(trace.get_tracer("penwatch")) is None  # the global proxy


def test_spans_of_records_never_written_end_at_close_or_when_the_sink_drops_them(memory):
    # begin_step opens a span on the dispatch thread; a record the sink's buffer dropped
    # (past max_pending) or never wrote before close still ends its span, once
    from penwatch.schema import RunInfo, StepRecord

    provider, exporter = memory
    sink = pw.sinks.OpenTelemetry(provider)
    sink.max_pending = 2
    sink.open(RunInfo(run="r", process=0, version="0", backend="cpu", devices=1, started_at=0.0))

    def record(step: int) -> StepRecord:
        values = {"l1": 1.0, "l1_weight": 0.5, "l1_weighted": 0.5}
        return StepRecord(run="r", process=0, step=step, pipeline="p", wall_time=1.0,
                          values=values, ready_at_ns=2_000_000_000)  # fmt: skip

    ids = [sink.begin_step(record(step)) for step in range(4)]
    dropped = sorted(s.attributes["penwatch.step"] for s in exporter.get_finished_spans())
    assert dropped == [0, 1]  # the two oldest, past max_pending
    sink.write_step(record(3))
    sink.close()
    spans = {s.attributes["penwatch.step"]: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == [0, 1, 2, 3]
    assert [spans[step].context.trace_id for step in range(4)] == ids
    assert all(s.end_time >= s.start_time for s in spans.values())
    sink.close()  # nothing left to end twice
    assert len(exporter.get_finished_spans()) == 4
