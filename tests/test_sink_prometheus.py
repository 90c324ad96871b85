"""pw.sinks.Prometheus: scrape the real /metrics endpoint of a short training run.

Every SPEC section 6 metric must be there with its type and labels, and hold the values
the monitor recorded; OpenMetrics scrapes carry the spans' trace ids as exemplars.
"""

from __future__ import annotations

import dataclasses
import http.server
import threading
import urllib.request

import jax
import jax.numpy as jnp
import prometheus_client
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

import penwatch as pw
from penwatch._demo import _train
from penwatch.schema import RunInfo, StepRecord

RUN = {"run", "process"}
PEN = RUN | {"pipeline", "penalty"}
# SPEC section 6, written out independently of the implementation.
SPEC_METRICS = {
    "penwatch_step": ("gauge", RUN),
    "penwatch_last_step_timestamp_seconds": ("gauge", RUN),
    "penwatch_loss": ("gauge", RUN),
    "penwatch_penalty_value": ("gauge", PEN),
    "penwatch_penalty_weighted_value": ("gauge", PEN),
    "penwatch_penalty_weight": ("gauge", PEN),
    "penwatch_pipeline_value": ("gauge", RUN | {"pipeline"}),
    "penwatch_penalty_grad_norm": ("gauge", PEN | {"wrt"}),
    "penwatch_penalty_grad_share": ("gauge", PEN),
    "penwatch_penalty_grad_cosine": ("gauge", PEN),
    "penwatch_nonfinite": ("counter", RUN | {"kind", "source"}),
    "penwatch_pipeline_compute_duration_seconds": ("histogram", RUN | {"pipeline"}),
    "penwatch_alerts": ("counter", RUN | {"alert"}),
    "penwatch_telemetry_dropped": ("counter", RUN | {"reason"}),
    "penwatch_run_info": ("gauge", RUN | {"version", "backend", "devices"}),
}
STEPS, NAN_AT = 24, 7


def _scrape(url: str, *, openmetrics: bool = False) -> str:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def run():
    """A short real training run (with one NaN step and an instrumented pipeline)."""
    records: list = []
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    prom = pw.sinks.Prometheus(port=0)
    monitor = pw.Monitor(
        "scrape",
        sinks=[prom, pw.sinks.OpenTelemetry(provider), pw.sinks.Callback(records.append)],
        alerts=[pw.alerts.NonFinite(), pw.alerts.LossSpike()],
    )
    _train.run(monitor, steps=STEPS, inject_nan_at=NAN_AT)
    inst = pw.instrument(pw.pipeline([("l1", 0.5), ("l2", 0.25)]), monitor, label="reg")
    inst.compute(jnp.arange(4.0), track_grad_norms=True)
    assert monitor.flush(timeout=30)
    text, om_text = _scrape(prom.url), _scrape(prom.url, openmetrics=True)
    yield {"records": records, "text": text, "om": om_text, "spans": spans, "prom": prom}
    monitor.close()
    provider.shutdown()


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_spec_metric_with_type_and_labels(run):
    families = _families(run["text"])
    for name, (kind, labels) in SPEC_METRICS.items():
        assert name in families, f"{name} missing from /metrics"
        fam = families[name]
        assert fam.type == kind, (name, fam.type)
        samples = [s for s in fam.samples if not s.name.endswith("_created")]
        assert samples, f"{name} has no samples"
        for sample in samples:
            got = set(sample.labels) - {"le"}
            assert got == labels, (name, got)
            assert sample.labels["run"] == "scrape" and sample.labels["process"] == "0"


def _value(families: dict, name: str, suffix: str = "", **labels: str) -> float:
    matches = [
        s.value
        for s in families[name].samples
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def test_values_equal_what_was_recorded(run):
    fam = _families(run["text"])
    demo = [r for r in run["records"] if r.pipeline == "demo"]
    last, last_diag = demo[-1], [r for r in demo if r.terms][-1]
    assert _value(fam, "penwatch_step") == run["records"][-1].step
    assert _value(fam, "penwatch_loss") == pytest.approx(last.loss)
    assert last.loss == pytest.approx(last.values["base_loss"])
    for p in ("entropy", "output_magnitude", "orthogonality", "l1", "l2"):
        want = last.penalty(p)
        kw = {"pipeline": "demo", "penalty": p}
        assert _value(fam, "penwatch_penalty_value", **kw) == pytest.approx(want.value)
        assert _value(fam, "penwatch_penalty_weighted_value", **kw) == pytest.approx(want.weighted)
        assert _value(fam, "penwatch_penalty_weight", **kw) == pytest.approx(want.weight)
    assert _value(fam, "penwatch_pipeline_value", pipeline="demo") == pytest.approx(
        last.values["total"]
    )
    for t in last_diag.terms:
        kw = {"pipeline": "demo", "penalty": t}
        diag = last_diag.term(t)
        assert _value(fam, "penwatch_penalty_grad_norm", wrt="params", **kw) == pytest.approx(
            diag.param_grad_norm
        )
        assert _value(fam, "penwatch_penalty_grad_share", **kw) == pytest.approx(diag.grad_share)
        assert _value(fam, "penwatch_penalty_grad_cosine", **kw) == pytest.approx(diag.grad_cosine)
    reg = run["records"][-1]
    assert reg.pipeline == "reg"
    assert _value(
        fam, "penwatch_penalty_grad_norm", wrt="input", pipeline="reg", penalty="l2"
    ) == pytest.approx(reg.values["l2_grad_norm"])
    # the NaN step: one detection per non-finite metric, one alert
    nan_rec = next(r for r in demo if r.step == NAN_AT)
    for nf in nan_rec.nonfinite:
        assert _value(fam, "penwatch_nonfinite", "_total", kind=nf.kind, source=nf.key) == 1
    assert _value(fam, "penwatch_alerts", "_total", alert="NonFinite") == 1
    assert _value(fam, "penwatch_alerts", "_total", alert="LossSpike") == 0
    assert _value(fam, "penwatch_telemetry_dropped", "_total", reason="queue_full") == 0
    info = _value(
        fam,
        "penwatch_run_info",
        version=pw.__version__,
        backend=jax.default_backend(),
        devices=str(jax.device_count()),
    )
    assert info == 1
    count = _value(fam, "penwatch_pipeline_compute_duration_seconds", "_count", pipeline="demo")
    total = _value(fam, "penwatch_pipeline_compute_duration_seconds", "_sum", pipeline="demo")
    assert count == len(demo)
    assert total == pytest.approx(sum(r.duration_seconds for r in demo))


def test_openmetrics_exemplars_carry_span_trace_ids(run):
    trace_ids = {format(s.context.trace_id, "032x") for s in run["spans"].get_finished_spans()}
    exemplars = [
        s.exemplar
        for f in openmetrics_families(run["om"])
        if f.name == "penwatch_pipeline_compute_duration_seconds"
        for s in f.samples
        if s.exemplar is not None
    ]
    assert exemplars
    assert {e.labels["trace_id"] for e in exemplars} <= trace_ids


def test_fresh_registry_by_default_and_injected_registry():
    a, b = pw.sinks.Prometheus(port=None), pw.sinks.Prometheus(port=None)
    assert a.registry is not REGISTRY and a.registry is not b.registry
    registry = CollectorRegistry()
    with pw.Monitor("r1", sinks=[a], alerts=[]) as m1, pw.Monitor("r2", sinks=[b], alerts=[]) as m2:
        m1.record(3, {"l1": 1.0, "l1_weight": 1.0})
        m2.record(4, {"l1": 1.0, "l1_weight": 1.0})
    assert a.registry.get_sample_value("penwatch_step", {"run": "r1", "process": "0"}) == 3
    assert b.registry.get_sample_value("penwatch_step", {"run": "r2", "process": "0"}) == 4
    c = pw.sinks.Prometheus(port=None, registry=registry)
    with pw.Monitor("r3", sinks=[c], alerts=[], process=2) as m3:
        m3.record(5, {"l1": 1.0, "l1_weight": 1.0})
    assert registry.get_sample_value("penwatch_step", {"run": "r3", "process": "2"}) == 5
    assert REGISTRY.get_sample_value("penwatch_step", {"run": "r3", "process": "2"}) is None


def test_pushgateway_receives_the_metrics_on_close():
    pushes: list[tuple[str, str, bytes]] = []

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            pushes.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        do_POST = do_PUT

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with pw.Monitor(
            "batch", sinks=[pw.sinks.Prometheus(port=None, pushgateway=url)], alerts=[]
        ) as monitor:
            monitor.record(9, {"l1": 1.0, "l1_weight": 1.0})
    finally:
        server.shutdown()
        server.server_close()
    assert pushes, "nothing was pushed"
    method, path, body = pushes[-1]
    assert path == "/metrics/job/penwatch/process/0/run/batch"
    assert b"penwatch_step" in body and method == "PUT"


def test_bad_options():
    with pytest.raises(ValueError, match=r"penwatch\.sinks\.Prometheus: option 'port'"):
        pw.sinks.Prometheus(port=70000)
    with pytest.raises(ValueError, match="option 'registry'"):
        pw.sinks.Prometheus(registry=object())


def test_gauges_follow_changing_key_layouts():
    # Diagnostics steps add keys every N steps; pipelines differ: a gauge keeps its last
    # value until a record carries its key again.
    sink = pw.sinks.Prometheus(port=None)
    sink.open(RunInfo("layouts", 0, "1", "cpu", 1, 0.0))
    plain = {"l2": 1.0, "l2_weighted": 0.1, "l2_weight": 0.1, "total": 0.1}
    diag = {**plain, "l2_param_grad_norm": 3.0, "l2_grad_share": 0.25, "base_grad_cosine": 1.0}
    layouts = [("a", plain), ("a", diag), ("b", plain), ("a", plain), ("a", diag)]
    for step, (pipe, values) in enumerate(layouts):
        values = {k: v + step for k, v in values.items()}
        sink.write_step(
            StepRecord(run="layouts", process=0, step=step, pipeline=pipe, wall_time=0.0,
                       values=values)
        )  # fmt: skip

    def sample(name: str, pipeline: str, penalty: str, **extra: str) -> float | None:
        labels = {"run": "layouts", "process": "0", "pipeline": pipeline, "penalty": penalty}
        return sink.registry.get_sample_value(name, {**labels, **extra})

    assert sample("penwatch_penalty_value", "a", "l2") == 1.0 + 4
    assert sample("penwatch_penalty_weighted_value", "b", "l2") == 0.1 + 2
    assert sample("penwatch_penalty_grad_share", "a", "l2") == 0.25 + 4
    assert sample("penwatch_penalty_grad_norm", "a", "l2", wrt="params") == 3.0 + 4
    assert sample("penwatch_penalty_grad_share", "b", "l2") is None
    sink.close()


def test_a_batch_exposes_what_the_same_records_one_by_one_expose():
    """write_steps merges only each layout's newest record: the exposition must equal
    that of writing every record in turn (layouts and pipelines interleaved, a NaN step,
    losses missing on the newest records, durations observed for all)."""
    from penwatch.store._synthetic import synthetic_record

    records = []
    for step in range(40):
        pipe = "b" if step % 5 == 3 else "a"
        r = synthetic_record(
            "batch",
            step,
            pipeline=pipe,
            diagnostics=step % 4 == 0,
            nan=step == 17,
            penalties=("l1", "l2") if pipe == "a" else ("kl",),
        )
        if step >= 37:
            r = dataclasses.replace(r, loss=None)
        records.append(r)
    info = RunInfo("batch", 0, "1", "cpu", 1, 0.0)
    one, many = pw.sinks.Prometheus(port=None), pw.sinks.Prometheus(port=None)
    one.open(info)
    many.open(info)
    for r in records:
        one.write_step(r)
    for start in (0, 7, 8, 29):  # batches of uneven sizes, the last one long
        many.write_steps(records[start : {0: 7, 7: 8, 8: 29, 29: 40}[start]])

    def exposition(sink: pw.sinks.Prometheus) -> list[str]:
        return sorted(
            line
            for line in prometheus_client.generate_latest(sink.registry).decode().splitlines()
            if not line.startswith("penwatch_run_info") and "_created" not in line
        )

    assert exposition(many) == exposition(one)
    assert (
        many.registry.get_sample_value("penwatch_loss", {"run": "batch", "process": "0"})
        == records[36].loss
    )
    one.close()
    many.close()
