"""pw.alerts: once per episode, reaching every sink; the NaN report of a real run."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest
import scipy.stats
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import penwatch as pw
from penwatch._demo import _train
from penwatch.alerts._spike import _score, _Window
from penwatch.schema import StepRecord, find_nonfinite, layout_of


def _record(step: int, values: dict[str, float], *, pipeline: str = "p") -> StepRecord:
    layout = layout_of(values)
    return StepRecord(
        run="r",
        process=0,
        step=step,
        pipeline=pipeline,
        wall_time=0.0,
        values=values,
        layout=layout,
        loss=values.get("loss"),
        nonfinite=find_nonfinite(tuple(values.values()), layout),
    )


def _fired(alert, series) -> list[int]:
    return [rec.step for rec in series for _ in alert.evaluate(rec)]


def test_nonfinite_fires_once_per_episode_and_per_pipeline():
    alert = pw.alerts.NonFinite()
    vals = [1.0, math.nan, math.nan, 1.0, math.inf, math.inf]
    series = [_record(i, {"a": v, "a_weight": 1.0}) for i, v in enumerate(vals)]
    assert _fired(alert, series) == [1, 4]
    other = _record(6, {"a": math.nan, "a_weight": 1.0}, pipeline="q")
    (event,) = alert.evaluate(other)
    assert event.kind == "nonfinite" and event.severity == "critical"
    assert event.attributes["metric"] == "a" and event.attributes["pipeline"] == "q"


def test_nonfinite_callback_action():
    calls = []
    alert = pw.alerts.NonFinite(action="callback", callback=lambda e, r: calls.append((e, r)))
    rec = _record(0, {"a": math.nan, "a_weight": 1.0})
    (event,) = alert.evaluate(rec)
    assert calls == [(event, rec)]


def test_gradient_dominance_patience_and_rearm():
    alert = pw.alerts.GradientDominance(threshold=0.5, patience=3)
    shares = [0.9, 0.9, None, 0.9, 0.9, 0.2, 0.9, 0.9, 0.9]  # None: no diagnostics
    series = []
    for i, s in enumerate(shares):
        values = {"loss": 1.0} if s is None else {"base_grad_share": 1 - s, "l2_grad_share": s}
        series.append(_record(i, values))
    assert _fired(alert, series) == [3, 8]
    (event,) = pw.alerts.GradientDominance(threshold=0.5, patience=1).evaluate(series[0])
    assert event.attributes["penalty"] == "l2" and event.attributes["grad_share"] == 0.9
    assert "dominates" in event.message


def test_gradient_conflict_ignores_nan_and_base():
    alert = pw.alerts.GradientConflict(cosine_below=-0.5, patience=2)
    cos = [-0.9, math.nan, -0.9, -0.9, -0.9, 0.1, -0.8, -0.8]
    series = [
        _record(i, {"base_grad_cosine": -1.0, "base_grad_share": 1.0, "ent_grad_cosine": c,
                    "ent_grad_share": 0.0})
        for i, c in enumerate(cos)
    ]  # fmt: skip
    assert _fired(alert, series) == [3, 7]


def test_robust_zscore_matches_scipy():
    rng = np.random.default_rng(0)
    history = rng.normal(1.0, 0.1, size=100)
    mad = scipy.stats.median_abs_deviation(history, scale="normal")
    want = (1.8 - np.median(history)) / mad
    assert pw.alerts.robust_zscore(1.8, history) == pytest.approx(want, rel=1e-3)
    assert pw.alerts.robust_zscore(5.0, [2.0] * 10) is None


@pytest.mark.parametrize("size", [3, 4, 127, 128])
def test_robust_zscore_matches_numpy_for_odd_and_even_windows(size):
    history = np.random.default_rng(size).lognormal(0.0, 0.5, size=size)
    median = np.median(history)
    mad = 1.4826 * np.median(np.abs(history - median))
    assert pw.alerts.robust_zscore(3.0, list(history)) == pytest.approx(
        (3.0 - median) / mad, rel=1e-12
    )


def test_robust_zscore_falls_back_to_the_mean_deviation_when_the_mad_is_zero():
    history = [1.0] * 6 + [2.0, 4.0]  # median 1, MAD 0, mean |h - 1| = 4/8
    assert pw.alerts.robust_zscore(3.0, history) == pytest.approx(2.0 / (1.2533 * 0.5))
    assert pw.alerts.robust_zscore(3.0, []) is None


@pytest.mark.parametrize("size", [3, 4, 7, 128])
@pytest.mark.parametrize("values", ["normal", "ties", "constant_runs"])
def test_loss_spike_window_scores_equal_robust_zscore_exactly(size, values):
    # LossSpike keeps its window sorted and finds the MAD by a k-th smallest search;
    # every score, through evictions and ties, must equal the two-sort definition
    rng = np.random.default_rng(size)
    series = {
        "normal": rng.normal(1.0, 0.1, size=600),
        "ties": rng.integers(0, 5, size=600) / 4.0,
        "constant_runs": np.repeat(rng.normal(size=60), 10),  # MAD 0: the fallback
    }[values].tolist()
    window = _Window(size)
    for i, value in enumerate(series):
        if window:
            want = _score(value, list(window.order))
            got = window.score(value)
            assert got == want or (got[0] is want[0] is None and got[1] == want[1]), (i, got, want)
        window.append(value)
        assert window.sorted == sorted(window.order)


@pytest.mark.parametrize("min_delta", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("values", ["noisy", "falling", "ties", "flat"])
def test_loss_spike_fires_where_the_definition_does(min_delta, values):
    # LossSpike searches for the MAD only when a value rose above the median by at least
    # min_delta (and by more than 0): its events must be exactly the definition's, the
    # robust z-score of every value against the window, once per episode
    rng = np.random.default_rng(7)
    series = {
        "noisy": 1.0 + 0.1 * rng.standard_t(2, size=400),  # heavy tails: many spikes
        "falling": np.exp(-np.arange(400) / 80) + 0.02 * rng.normal(size=400),
        "ties": rng.integers(0, 4, size=400) / 2.0,
        "flat": 1.0 + 0.01 * rng.normal(size=400),  # spikes of a few hundredths
    }[values]
    series[::37] += 2.0  # spikes above min_delta, among the series' own
    series = series.tolist()
    zscore, window = 3.0, 24
    alert = pw.alerts.LossSpike(zscore=zscore, window=window, min_delta=min_delta)
    fired = _fired(alert, [_record(i, {"loss": v}) for i, v in enumerate(series)])
    want, armed = [], True
    for i, value in enumerate(series):
        history = series[max(0, i - window) : i]
        spike = False
        if len(history) >= alert.min_history:
            z, median = _score(value, history)
            spike = z is not None and z > zscore and value - median >= min_delta
        if spike and armed:
            want.append(i)
        armed = not spike
    assert fired == want
    assert len(want) >= 5  # the series exercise the scoring


@pytest.mark.parametrize("rise, min_delta", [(0.05, 0.05), (1e-3, 0.0)])
def test_loss_spike_fires_at_the_floor_and_on_tiny_rises(rise, min_delta):
    # a rise of exactly min_delta fires (>=), and without a floor any rise far above a
    # tiny spread does: the shortcut past the MAD search must not skip either
    spread = [1e-5 * (i % 5 - 2) for i in range(15)]  # median 1.0 exactly
    series = [_record(i, {"loss": 1.0 + d}) for i, d in enumerate(spread)]
    series.append(_record(15, {"loss": 1.0 + rise}))
    alert = pw.alerts.LossSpike(zscore=6.0, window=15, min_delta=min_delta, min_history=8)
    assert _fired(alert, series) == [15]


def test_loss_spike_fires_once_per_spike_through_every_sink(tmp_path):
    rng = np.random.default_rng(1)
    losses = list(1.0 + 0.01 * rng.normal(size=60))
    losses[40] = losses[41] = 3.0  # one two-step episode
    losses[55] = 2.0  # a second episode
    events: list = []
    db = tmp_path / "spike.db"
    prom = pw.sinks.Prometheus(port=None)
    with pw.Monitor(
        "spike",
        sinks=[pw.sinks.Callback(lambda r: None, on_event=events.append), prom,
               pw.sinks.SQLite(db)],
        alerts=[pw.alerts.LossSpike(zscore=6.0, window=32)],
    ) as monitor:  # fmt: skip
        for step, loss in enumerate(losses):
            monitor.record(step, {"total": 0.0}, loss=loss)
    assert [e.step for e in events] == [40, 55]
    assert events[0].name == "LossSpike" and events[0].attributes["zscore"] > 6
    labels = {"run": "spike", "process": "0", "alert": "LossSpike"}
    assert prom.registry.get_sample_value("penwatch_alerts_total", labels) == 2
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT step, kind, name FROM events ORDER BY step").fetchall()
    assert rows == [(40, "alert", "LossSpike"), (55, "alert", "LossSpike")]


def test_loss_spike_on_any_metric():
    alert = pw.alerts.LossSpike(zscore=4.0, window=16, metric="total")
    series = [_record(i, {"total": 1.0 + 0.01 * (i % 3)}) for i in range(20)]
    series.append(_record(20, {"total": 9.0}))
    assert _fired(alert, series) == [20]


def test_loss_spike_has_an_absolute_floor():
    # The case: a converged loss around 0.005 moving to 0.02 scores z >> 6 (the
    # spread is ~1e-4) but rose by 0.015 < SPIKE_MIN_DELTA: no spike, not six of them.
    series = [_record(i, {"loss": 0.005 + 1e-4 * (i % 3 - 1)}) for i in range(40)]
    series += [_record(40 + i, {"loss": 0.02}) for i in range(6)]
    alert = pw.alerts.LossSpike(window=32)
    assert alert.min_delta == pw.schema.thresholds.SPIKE_MIN_DELTA
    assert _fired(alert, series) == []
    # The same series fires once without the floor, and a real jump still fires with it.
    assert _fired(pw.alerts.LossSpike(window=32, min_delta=0.0), series) == [40]
    jump = [*series[:40], _record(40, {"loss": 0.5})]
    assert _fired(pw.alerts.LossSpike(window=32), jump) == [40]


def test_loss_spike_rejects_a_bad_floor():
    with pytest.raises(ValueError, match="option 'min_delta' must be"):
        pw.alerts.LossSpike(min_delta=-1.0)


def test_injected_nan_end_to_end(tmp_path):
    """Counter, span status ERROR, one alert, a store event, a report naming the culprit."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    events: list = []
    records: list = []
    db = tmp_path / "nan.db"
    prom = pw.sinks.Prometheus(port=None)
    monitor = pw.Monitor(
        "nan-run",
        sinks=[
            prom,
            pw.sinks.OpenTelemetry(provider),
            pw.sinks.SQLite(db),
            pw.sinks.Callback(records.append, on_event=events.append),
        ],
        alerts=[pw.alerts.NonFinite()],
    )
    _train.run(monitor, steps=12, inject_nan_at=6)
    monitor.close()
    provider.shutdown()
    # the alert fired exactly once, naming the term and the parameter leaf
    (event,) = events
    assert event.step == 6 and event.kind == "nonfinite"
    assert event.attributes["penalty"] == "orthogonality"
    assert event.attributes["metric"] == "orthogonality_weight"
    assert event.attributes["leaves"][0] == {
        "tree": "grads", "path": "['hidden']['w']", "nan": 64 * 16, "inf": 0,
    }  # fmt: skip
    assert "orthogonality" in event.message and "grads['hidden']['w']" in event.message
    bad = records[6]
    assert bad.first_offender.penalty == "orthogonality"
    assert [lf.path for lf in bad.leaves] == ["['hidden']['w']"]  # only that leaf
    assert all(r.ok for r in records if r.step != 6)  # skip_nonfinite kept the run healthy
    # Prometheus counters
    base = {"run": "nan-run", "process": "0"}
    for nf in bad.nonfinite:
        got = prom.registry.get_sample_value(
            "penwatch_nonfinite_total", {**base, "kind": nf.kind, "source": nf.key}
        )
        assert got == 1
    assert (
        prom.registry.get_sample_value("penwatch_alerts_total", {**base, "alert": "NonFinite"}) == 1
    )
    # span status
    (span,) = [s for s in exporter.get_finished_spans() if s.attributes["penwatch.step"] == 6]
    assert span.status.status_code == StatusCode.ERROR
    # the store's events table
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT step, kind, name, severity FROM events").fetchall()
        nonfinite = conn.execute("SELECT step, nonfinite FROM steps WHERE nonfinite > 0").fetchall()
    assert rows == [(6, "nonfinite", "NonFinite", "critical")]
    assert nonfinite == [(6, len(bad.nonfinite))]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: pw.alerts.NonFinite(action="shout"), "NonFinite: option 'action' must be one of"),
        (lambda: pw.alerts.NonFinite(action="callback"), "option 'callback' must be callable"),
        (lambda: pw.alerts.NonFinite(callback=print), "option 'callback' must be None unless"),
        (lambda: pw.alerts.GradientDominance(patience=0), "option 'patience' must be an integer"),
        (lambda: pw.alerts.GradientDominance(threshold=math.nan), "option 'threshold'"),
        (lambda: pw.alerts.GradientConflict(cosine_below=2), r"'cosine_below' must be .* \[-1"),
        (lambda: pw.alerts.LossSpike(zscore=0), "option 'zscore' must be"),
        (lambda: pw.alerts.LossSpike(window=2), "option 'window' must be an integer >= 3"),
        (lambda: pw.alerts.LossSpike(metric=""), "option 'metric'"),
    ],
)
def test_bad_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_find_nonfinite_is_exact_around_its_sum_shortcut():
    """The shortcut (a finite sum means every value is finite) must never hide a NaN or
    an Inf, and values whose sum overflows are still all finite."""
    keys = ["l1", "l1_weighted", "l1_weight", "total"]
    layout = layout_of(dict.fromkeys(keys, 0.0), ["l1"])
    assert find_nonfinite((1e308, 1e308, 1e308, -1.0), layout) == ()
    for bad in (math.nan, math.inf, -math.inf):
        for i in range(len(keys)):
            values = [1.0, 2.0, 3.0, 4.0]
            values[i] = bad
            (found,) = find_nonfinite(tuple(values), layout)
            assert found.key == keys[i]
    found = find_nonfinite((math.inf, -math.inf, 1.0, math.nan), layout)
    assert [f.key for f in found] == ["l1", "l1_weighted", "total"]
