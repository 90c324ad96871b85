"""The Streamlit dashboard under streamlit.testing (AppTest), on stores written by the
SQLite sink's writer: empty, missing, normal, NaN/Inf, multi-run, multi-process, large."""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import sources
from penwatch import store
from penwatch.schema import Event, RunInfo, StepRecord
from penwatch.store._synthetic import synthetic_run

APP = str(pathlib.Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
TITLES = {
    "Weighted penalty contributions (stacked)",
    "Share of total penalty (latest)",
    "Base loss and total penalty",
    "Compute duration percentiles (recent steps)",
    "Gradient norm per term (log scale)",
    "Gradient share per term",
    "Cosine to the base-loss gradient",
    "Latest gradient share per term",
    "Non-finite events and alerts",
}


def _write(path, runs: dict[tuple[str, int], list[StepRecord]], events=()) -> None:
    w = store.StoreWriter(path, batch_size=5000, flush_interval=1e9)
    for run, process in runs:
        w.open_run(RunInfo(run, process, "1.0", "cpu", 1, time.time()))
    for records in runs.values():
        for r in records:
            w.add_step(r)
    for e in events:
        w.add_event(e)
    w.close()


def _lean(run: str, steps: int, spike: int) -> list[StepRecord]:
    """Minimal records (one penalty) for the 200,000-step store."""
    out = []
    for s in range(steps):
        loss = 1.0 / (1 + s / 1000) + (50.0 if s == spike else 0.0)
        v = {
            "l2": 1.0,
            "l2_weighted": 0.01 * (1 + (s % 100) / 100),
            "l2_weight": 0.01,
            "l2_finite": 1.0,
            "l2_grad_norm": 0.5,
            "total": 0.01,
            "loss": loss + 0.01,
        }
        out.append(StepRecord(run, 0, s, "default", 1e9 + s, v, loss=loss, duration_seconds=0.003))
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("stores")
    paths = {k: d / f"{k}.db" for k in ("empty", "normal", "multirun", "multiproc", "large")}
    paths["missing"] = d / "missing.db"
    store.StoreWriter(paths["empty"]).close()
    now = time.time()
    _write(
        paths["normal"],
        {("demo", 0): list(synthetic_run("demo", 2500, nan_at=(50,), spike_at=(300,)))},
        [
            Event(
                "demo",
                0,
                50,
                now,
                "nonfinite",
                "NonFinite",
                "orthogonality went NaN",
                severity="critical",
                attributes={"metrics": ["orthogonality"]},
            ),
            Event(
                "demo",
                0,
                2400,
                now,
                "alert",
                "GradientDominance",
                "l2 dominates",
                attributes={"penalty": "l2"},
            ),
        ],
    )
    _write(
        paths["multirun"],
        {
            ("a", 0): list(synthetic_run("a", 300)),
            ("b", 0): list(synthetic_run("b", 120, diagnostics=False)),
        },
    )
    _write(
        paths["multiproc"],
        {
            ("mp", 0): list(synthetic_run("mp", 200)),
            ("mp", 1): list(synthetic_run("mp", 150, process=1)),
        },
    )
    _write(paths["large"], {("long", 0): _lean("long", 200_000, spike=123_457)})
    return paths


def _run(monkeypatch, db) -> AppTest:
    monkeypatch.setenv("PENWATCH_DB", str(db))
    monkeypatch.delenv("PENWATCH_PROMETHEUS_URL", raising=False)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    return at


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _charts(at: AppTest) -> dict[str, tuple[dict, list]]:
    """title -> (spec, [DataFrame per dataset]) of every Vega-Lite chart on the page."""
    out = {}
    for c in at.get("vega_lite_chart"):
        spec = json.loads(c.proto.spec)
        frames = [pa.ipc.open_stream(d.data.data).read_pandas() for d in c.proto.datasets]
        title = spec.get("title") or spec.get("layer", [{}])[0].get("title")
        out[title if isinstance(title, str) else json.dumps(title)] = (spec, frames)
    return out


@pytest.mark.parametrize("name", ["missing", "empty"])
def test_missing_or_empty_store_shows_a_friendly_message(stores, monkeypatch, name):
    at = _run(monkeypatch, stores[name])
    text = " ".join(i.value for i in at.info)
    assert ("No penwatch store" in text) if name == "missing" else ("no runs yet" in text)
    assert not at.get("vega_lite_chart") and not at.error


def test_normal_run_every_view(stores, monkeypatch):
    at = _run(monkeypatch, stores["normal"])
    m = _metrics(at)
    assert m["Step"] == "2,499"
    assert float(m["Base loss"]) == pytest.approx(2 * np.exp(-2.499) + 0.1, abs=0.03)
    assert m["Non-finite values"] == "4" and m["Open alerts"] == "1"
    assert m["Penalty share of loss"].endswith("%")
    assert {"p50 duration", "p90 duration", "p99 duration"} <= m.keys()
    charts = _charts(at)
    assert set(charts) == TITLES
    area, (data,) = charts["Weighted penalty contributions (stacked)"]
    assert area["mark"]["type"] == "area" and area["encoding"]["y"]["stack"] == "zero"
    assert area["encoding"]["y"]["title"] == "weight × penalty (loss units)"
    assert set(data["penalty"]) == {"l1", "l2", "entropy", "orthogonality"}
    # downsampled (2,500 steps -> width 8) but the step-300 loss spike survives
    assert "min–max per 8 steps" in area["encoding"]["x"]["title"]
    _, frames = charts["Base loss and total penalty"]
    loss = frames[0][frames[0]["series"] == "base loss"]
    assert loss["value"].max() > 20 and np.isfinite(frames[0]["value"].dropna()).all()
    assert 48 <= frames[1]["step"].min() <= 50  # the non-finite marker
    norm, _ = charts["Gradient norm per term (log scale)"]
    assert norm["layer"][0]["encoding"]["y"]["scale"]["type"] == "log"
    # l2 dominates late in the run: highlighted bar and a warning naming it
    _, (terms,) = charts["Latest gradient share per term"]
    assert terms.set_index("term").loc["l2", "status"] == "dominating"
    assert terms.set_index("term").loc["orthogonality", "status"] == "conflicting"
    warnings = " ".join(w.value for w in at.warning)
    assert "**l2** dominates" in warnings and "**orthogonality** conflicts" in warnings
    assert "first offender `orthogonality`" in at.error[0].value
    _, (events,) = charts["Non-finite events and alerts"]
    assert set(events["kind"]) == {"nonfinite", "alert"}
    assert "run **demo**" in at.caption[-1].value


def test_nan_and_inf_never_reach_a_chart(stores, monkeypatch):
    at = _run(monkeypatch, stores["normal"])
    for _, frames in _charts(at).values():
        for frame in frames:
            numeric = frame.select_dtypes("number").to_numpy(dtype=float)
            assert not np.isinf(numeric).any()


def test_run_picker_switches_runs(stores, monkeypatch):
    at = _run(monkeypatch, stores["multirun"])
    picker = at.selectbox(key="penwatch_run")
    assert sorted(picker.options) == ["a", "b"] or len(picker.options) == 2
    first = _metrics(at)["Step"]
    other = "b" if picker.value == "a" else "a"
    at = picker.select(other).run()
    assert not at.exception
    assert _metrics(at)["Step"] != first
    if other == "b":  # run b has no gradient diagnostics: input-gradient norms only
        assert "Gradient norms" in [s.value for s in at.subheader]


def test_process_picker_and_all_processes_aggregate(stores, monkeypatch):
    at = _run(monkeypatch, stores["multiproc"])
    proc = at.selectbox(key="penwatch_process")
    assert proc.options == ["all processes", "process 0", "process 1"]
    assert _metrics(at)["Step"] == "199"  # the furthest process
    at = proc.select("process 1").run()
    assert _metrics(at)["Step"] == "149" and "process 1" in at.caption[-1].value


def test_large_run_is_downsampled_and_keeps_its_spike(stores, monkeypatch):
    at = _run(monkeypatch, stores["large"])
    assert _metrics(at)["Step"] == "199,999"
    charts = _charts(at)
    spec, (data,) = charts["Weighted penalty contributions (stacked)"]
    assert "min–max per 512 steps" in spec["encoding"]["x"]["title"]
    assert len(data) <= 2 * 400
    _, frames = charts["Base loss and total penalty"]
    assert frames[0]["value"].max() > 50  # the single-step spike at step 123,457
    t0 = time.perf_counter()
    at.run()  # a refresh: incremental, nothing new to read
    assert not at.exception
    print(f"refresh of the 200,000-step store: {time.perf_counter() - t0:.3f}s")


def test_live_store_updates_incrementally(tmp_path, monkeypatch):
    path = tmp_path / "live.db"
    w = store.StoreWriter(path, flush_interval=1e9)
    w.open_run(RunInfo("live", 0, "1", "cpu", 1, time.time()))
    for r in synthetic_run("live", 100):
        w.add_step(r)
    w.flush()
    at = _run(monkeypatch, path)
    assert _metrics(at)["Step"] == "99"
    source = at.session_state[f"penwatch-source::{path}"]
    cache = source._cache[("live", None)]
    seen = cache.last_metric_id
    for r in synthetic_run("live", 50, start=100, nan_at=(120,)):
        w.add_step(r)
    w.flush()
    at.run()
    assert _metrics(at)["Step"] == "149" and _metrics(at)["Non-finite values"] == "4"
    assert cache.last_metric_id > seen  # read from where it left off
    calls = []
    original = store.StoreReader.values
    monkeypatch.setattr(
        store.StoreReader,
        "values",
        lambda self, *a, **k: calls.append(k) or original(self, *a, **k),
    )
    at.run()
    assert calls and calls[-1]["since_id"] == cache.last_metric_id
    w.close()


def test_config_from_args_and_env():
    c = sources.Config.from_env(["--db", "x.db", "--refresh", "3"], env={})
    assert (c.db, c.prometheus, c.refresh_seconds) == ("x.db", None, 3.0)
    c = sources.Config.from_env(
        [], env={"PENWATCH_DB": "y.db", "PENWATCH_PROMETHEUS_URL": "http://p:9090"}
    )
    assert (c.db, c.prometheus) == ("y.db", "http://p:9090")
    with pytest.raises(ValueError, match="--refresh"):
        sources.Config.from_env(["--refresh", "0"], env={})
