"""The dashboard's Prometheus source against a Prometheus-compatible HTTP API.

A small ``http.server`` on 127.0.0.1 answers ``/api/v1/query`` and ``/api/v1/query_range``
from one consistent model of a run (the SPEC §6 metric names and labels), and records the
PromQL it receives.
"""

from __future__ import annotations

import http.server
import json
import math
import pathlib
import re
import threading
import time
import urllib.parse

import pytest
from penwatch.dashboard.prom_source import PrometheusSource
from penwatch.dashboard.sources import SourceUnavailable
from streamlit.testing.v1 import AppTest

APP = str(pathlib.Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
RUN = "prom-run"
WEIGHTED = {"l1": 0.1, "l2": 0.3, "entropy": 0.05}
SHARE = {"base": 0.3, "l1": 0.05, "l2": 0.6, "entropy": 0.05}
COSINE = {"base": 1.0, "l1": 0.2, "l2": 0.1, "entropy": -0.7}
WEIGHT = {"l1": 0.01, "l2": 3.0, "entropy": 0.1}
SUGGESTED_L2 = 0.8
UPDATE_SHARE = {"base": 0.35, "l2": 0.65}
GROUP_NORM = {("base", "dense1"): 1.2, ("base", "dense2"): 0.3, ("l2", "dense1"): 0.9}


class Model:
    """A run that started 600 s ago, 2 steps per second."""

    def __init__(self) -> None:
        self.t0 = time.time() - 600

    def step(self, t: float) -> int:
        return int((t - self.t0) * 2)

    def series(self, query: str, t: float) -> list[tuple[dict[str, str], float]]:
        if t < self.t0:
            return []
        base = {"run": RUN, "process": "0"}
        if "ALERTS" in query:
            return [({"alertname": "PenwatchGradientDominance", "run": RUN}, 1.0)]
        q = re.match(r"histogram_quantile\(([\d.]+)", query)
        if q:
            return [({}, float(q.group(1)) * 0.01)]
        name = re.search(r"penwatch_[a-z_]+", query).group(0)
        pens = {"pipeline": "default"}
        if name in ("penwatch_step", "penwatch_pipeline_compute_duration_seconds_count"):
            return [(base, float(self.step(t)))]
        if name == "penwatch_last_step_timestamp_seconds":
            return [(base, t)]
        if name == "penwatch_loss":
            return [(base, 1.0 + 0.5 * math.exp(-self.step(t) / 500))]
        if name == "penwatch_pipeline_value":
            return [({**base, **pens}, sum(WEIGHTED.values()))]
        if name == "penwatch_penalty_weighted_value":
            return [({**base, **pens, "penalty": p}, v) for p, v in WEIGHTED.items()]
        if name == "penwatch_penalty_grad_norm":
            if 'wrt="params"' not in query:
                return []
            return [
                ({**base, **pens, "penalty": p, "wrt": "params"}, 1.0 + s) for p, s in SHARE.items()
            ]
        if name == "penwatch_penalty_grad_share":
            return [({**base, **pens, "penalty": p}, v) for p, v in SHARE.items()]
        if name == "penwatch_penalty_grad_cosine":
            return [({**base, **pens, "penalty": p}, v) for p, v in COSINE.items()]
        if name == "penwatch_penalty_weight":
            return [({**base, **pens, "penalty": p}, v) for p, v in WEIGHT.items()]
        if name == "penwatch_penalty_suggested_weight":
            return [({**base, **pens, "penalty": "l2"}, SUGGESTED_L2)]
        if name == "penwatch_penalty_update_share":
            return [({**base, **pens, "penalty": p}, v) for p, v in UPDATE_SHARE.items()]
        if name == "penwatch_penalty_group_grad_norm":
            return [
                ({**base, **pens, "penalty": p, "group": g}, v) for (p, g), v in GROUP_NORM.items()
            ]
        if name == "penwatch_nonfinite_total":
            n = 2.0 if t >= self.t0 + 300 else 0.0
            return [({**base, "source": "l2", "kind": "nan"}, n)]
        if name == "penwatch_alerts_total":
            return [({**base, "alert": "GradientDominance"}, 1.0 if t >= self.t0 + 400 else 0.0)]
        return []


class Handler(http.server.BaseHTTPRequestHandler):
    model: Model
    log: list[tuple[str, dict[str, str]]]

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        params = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        self.log.append((url.path, params))
        query = params.get("query", "")
        if url.path == "/api/v1/query":
            t = float(params.get("time", time.time()))
            result = [{"metric": m, "value": [t, repr(v)]} for m, v in self.model.series(query, t)]
            data = {"resultType": "vector", "result": result}
        elif url.path == "/api/v1/query_range":
            start, end, step = (float(params[k]) for k in ("start", "end", "step"))
            by: dict[str, dict] = {}
            t = start
            while t <= end:
                for m, v in self.model.series(query, t):
                    key = json.dumps(m, sort_keys=True)
                    by.setdefault(key, {"metric": m, "values": []})["values"].append([t, repr(v)])
                t += step
            data = {"resultType": "matrix", "result": list(by.values())}
        else:
            self.send_error(404)
            return
        body = json.dumps({"status": "success", "data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def prometheus():
    handler = type("H", (Handler,), {"model": Model(), "log": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_runs_and_snapshot_match_the_model(prometheus):
    url, handler = prometheus
    source = PrometheusSource(url, lookback=900, max_points=300)
    (run,) = source.runs()
    assert (run.name, run.processes, run.status) == (RUN, (0,), "running")
    snap = source.snapshot(RUN, None)
    h = snap.headline
    model = handler.model
    assert abs(h.step - model.step(time.time())) <= 4
    assert h.total == pytest.approx(0.45)
    assert h.loss == pytest.approx(1.0 + 0.5 * math.exp(-h.step / 500), rel=1e-2)
    assert h.penalty_share == pytest.approx(0.45 / (0.45 + h.loss))
    assert (h.alerts, h.open_alerts) == (1, 1)
    # 2 non-finite values in one scrape interval: at least 1 step, one episode, near step 600
    nf = snap.nonfinite
    assert (nf.steps, nf.episodes, nf.exact) == (1, 1, False)
    # located by samples (2 steps/s here): at most the steps since two samples earlier
    assert nf.steps_max <= 2 * 2 * source.resolution and abs(nf.first_step - 600) <= 14
    assert set(snap.contributions["penalty"]) == set(WEIGHTED)
    shares = snap.shares.set_index("penalty")["share"]
    assert shares["l2"] == pytest.approx(0.3 / 0.45)
    # x is the training step, read from penwatch_step at the same times
    assert snap.contributions["step"].max() <= h.step and snap.contributions["step"].min() >= 0
    status = snap.terms.set_index("term")["status"]
    assert status["l2"] == "dominating" and status["entropy"] == "conflicting"
    assert status["base"] == "ok" and snap.grad_wrt == "params"
    assert set(snap.grads["quantity"]) == {"grad_norm", "grad_share", "grad_cosine"}
    assert snap.duration_summary["p99"] == pytest.approx(9.9)
    assert set(snap.durations["percentile"]) == {"p50", "p90", "p99"}
    (al,) = snap.events[snap.events["kind"] == "alert"].itertuples()
    assert al.name == "GradientDominance" and abs(al.step - 800) <= 10
    queries = [p["query"] for _, p in handler.log if "query" in p]
    assert any(f'penwatch_penalty_weighted_value{{run="{RUN}"}}' in q for q in queries)
    assert any("penwatch_pipeline_compute_duration_seconds_bucket" in q for q in queries)


def test_refresh_asks_only_for_new_time(prometheus):
    url, handler = prometheus
    source = PrometheusSource(url, lookback=900, max_points=300)
    source.snapshot(RUN, 0)
    handler.log.clear()
    time.sleep(0.05)
    source.snapshot(RUN, 0)
    starts = [float(p["start"]) for path, p in handler.log if path.endswith("query_range")]
    assert starts and min(starts) >= time.time() - 2 * source.resolution - 5
    assert all(
        'process="0"' in p["query"]
        for path, p in handler.log
        if path.endswith("query_range")
        and "penwatch_" in p["query"]
        and "by (run, process)" not in p["query"]  # the run list: every run in the lookback
    )


def test_app_reads_prometheus(prometheus, monkeypatch):
    url, _ = prometheus
    monkeypatch.setenv("PENWATCH_PROMETHEUS_URL", url)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Total penalty"] == "0.45" and metrics["Open alerts"] == "1"
    assert metrics["Non-finite steps"].startswith("1–") and metrics["Non-finite episodes"] == "≥ 1"
    assert len(at.get("vega_lite_chart")) == 10  # 9 and the dominance heat map
    assert "Prometheus" in at.caption[0].value


def test_unreachable_prometheus_is_a_friendly_message(monkeypatch):
    with pytest.raises(SourceUnavailable, match="not answering"):
        PrometheusSource("http://127.0.0.1:9", timeout=1).runs()
    monkeypatch.setenv("PENWATCH_PROMETHEUS_URL", "http://127.0.0.1:9")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and "not answering" in at.info[0].value


def test_a_run_without_recent_steps_is_idle_not_crashed(prometheus, monkeypatch):
    # Prometheus keeps no run status: past the heartbeat limit a run is "idle"
    url, _ = prometheus
    (run,) = PrometheusSource(url, lookback=900, max_points=300, stale_after=1e-6).runs()
    assert run.status == "idle" and not run.live and run.process_statuses == ()
    monkeypatch.setenv("PENWATCH_PROMETHEUS_URL", url)
    monkeypatch.setenv("PENWATCH_STALE_AFTER", "0.000001")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    assert any("Prometheus cannot tell" in i.value for i in at.info)
    assert "status **idle** (not live)" in at.caption[-1].value
    assert {m.label: m.value for m in at.metric}["Total penalty"] == "0.45"


def test_dominance_section_from_prometheus_says_the_what_if_needs_the_store(
    prometheus, monkeypatch
):
    from penwatch.dashboard._text import md_escape

    url, _ = prometheus
    source = PrometheusSource(url, lookback=900, max_points=300)
    assert source.diagnostics_steps(RUN, None) == []
    assert source.step_values(RUN, None, 10) is None  # no per-step values
    _, where, values = source.step_values(RUN, None, None)
    assert where == "latest readings, pipeline default"
    assert values["l2_grad_share"] == SHARE["l2"] and values["l2_suggested_weight"] == 0.8
    assert values["l2_weight"] == WEIGHT["l2"] and values["entropy_param_grad_norm"] == 1.05
    monkeypatch.setenv("PENWATCH_PROMETHEUS_URL", url)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    infos = [i.value for i in at.info]
    # the answer in words from the latest readings: l2 dominates, with its suggestion
    assert md_escape(
        "l2 dominates the update: gradient share 0.6; suggested weight 0.8 (now 3)"
    ) in (infos)
    assert any("what-if sliders need the SQLite store" in i for i in infos)
    assert not at.select_slider  # no step picker, no weight sliders
    (shares,) = [d.value for d in at.dataframe if "update share" in d.value.columns]
    shares = shares.set_index("term")
    assert shares.loc["l2", "suggested weight"] == 0.8
    assert shares.loc["l2", "update share"] == UPDATE_SHARE["l2"]
    (heatmap,) = [c for c in at.get("vega_lite_chart") if "Where each term acts" in c.proto.spec]
    import pyarrow as pa

    (data,) = [pa.ipc.open_stream(d.data.data).read_pandas() for d in heatmap.proto.datasets]
    assert set(zip(data["term"], data["group"], strict=True)) == set(GROUP_NORM)
