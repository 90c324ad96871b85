"""The Streamlit dashboard under streamlit.testing (AppTest), on stores written by the
SQLite sink's writer: empty, missing, normal, NaN/Inf, multi-run, multi-process, large;
run statuses (stopped, failed, crashed); user text that looks like Markdown or HTML."""

from __future__ import annotations

import html
import json
import math
import pathlib
import re
import sqlite3
import string
import time

import numpy as np
import pyarrow as pa
import pytest
from penwatch.dashboard import sources
from penwatch.dashboard._runs import RunChoice, combine_statuses, status_note
from penwatch.dashboard._text import md_escape
from streamlit.testing.v1 import AppTest

from penwatch import store
from penwatch.schema import Event, RunInfo, StepRecord, thresholds
from penwatch.store._synthetic import synthetic_record, synthetic_run

APP = str(pathlib.Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
TITLES = {
    "Weighted penalty contributions (stacked)",
    "Share of total penalty (latest)",
    "Base loss and total penalty",
    "Device time per step, percentiles (recent steps)",
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
    # counts of steps and episodes, not of values (the NaN step holds 4 non-finite values)
    assert m["Non-finite steps"] == "1" and m["Non-finite episodes"] == "1"
    assert m["Open alerts"] == "1"
    assert m["Penalty share of loss"].endswith("%")
    assert {"p50 device time", "p90 device time", "p99 device time"} <= m.keys()
    charts = _charts(at)
    assert set(charts) == TITLES
    area, (data,) = charts["Weighted penalty contributions (stacked)"]
    assert area["mark"]["type"] == "area" and area["encoding"]["y"]["stack"] == "zero"
    assert area["encoding"]["y"]["title"] == "weight × penalty (loss units)"
    assert set(data["penalty"]) == {"l1", "l2", "entropy", "orthogonality"}
    # downsampled (2,500 steps -> width 16) but the step-300 loss spike survives
    assert "min–max per 16 steps" in area["encoding"]["x"]["title"]
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
    errors = [e.value for e in at.error]
    assert "first offender **orthogonality**" in " ".join(errors)
    # the page leads with what needs attention, in words
    assert errors[0] == "Non-finite values: " + md_escape(
        "1 non-finite step in 1 episode; the first at step 50."
    )
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
    assert proc.options == ["all processes", "process 0 · running", "process 1 · running"]
    assert _metrics(at)["Step"] == "199"  # the furthest process
    at = proc.select(1).run()
    assert _metrics(at)["Step"] == "149" and "process 1" in at.caption[-1].value


def test_large_run_is_downsampled_and_keeps_its_spike(stores, monkeypatch):
    at = _run(monkeypatch, stores["large"])
    assert _metrics(at)["Step"] == "199,999"
    charts = _charts(at)
    spec, (data,) = charts["Weighted penalty contributions (stacked)"]
    assert "min–max per 1024 steps" in spec["encoding"]["x"]["title"]
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
    source = at.session_state[f"penwatch-source::{path}:{thresholds.STALE_AFTER_SECONDS:g}"]
    cache = source._cache[("live", None)]
    seen = cache.last_metric_id
    for r in synthetic_run("live", 50, start=100, nan_at=(120,)):
        w.add_step(r)
    w.flush()
    at.run()
    assert _metrics(at)["Step"] == "149" and _metrics(at)["Non-finite steps"] == "1"
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


# --- run statuses and user text (SPEC section 11) --------------------------------------

HOSTILE_RUN = "**bold** <b>tag</b> [a](http://e) # h"
HOSTILE_PIPELINE = "<i>pipe</i> _u_"
HOSTILE_PENALTY = "l1_[x](http://e)"
HOSTILE_NAN = ":red[b] $m$ :smile:"
HOSTILE_MESSAGE = "went $a$ and :red[b] <b>x</b> [c](http://e) `tick`"
STALE_AFTER = 600.0
"""The heartbeat limit the status tests give the dashboard (``PENWATCH_STALE_AFTER``)."""
STATUS_RUNS = {  # run -> (stored status, heartbeat age in seconds)
    HOSTILE_RUN: ("stopped", 2),
    "live-run": ("running", 10),
    "finished-run": ("finished", 30),
    "failed-run": ("failed", 120),
    "crashed-run": ("running", 3600),
}


def write_status_store(path: pathlib.Path) -> None:
    """A store with a run in every status, the freshest one named like Markdown and HTML.

    The stopped run has two pipelines (so pipeline names reach the labels), hostile
    penalty names, a NaN at step 40 whose first offender is hostile, and events with a
    hostile name and message. Statuses and heartbeats are set with raw SQL, as the
    monitor would leave them (the writer may not write ``stopped``/``failed`` itself).
    """
    now = time.time()
    w = store.StoreWriter(path, batch_size=5000, flush_interval=1e9)
    for run in STATUS_RUNS:
        w.open_run(RunInfo(run, 0, "1.0", "cpu", 1, now - 100))
    for step in range(60):
        wall = now - 100 + step
        for pipeline, penalties in (
            (HOSTILE_PIPELINE, (HOSTILE_PENALTY, "orthogonality")),
            ("default", ("l2", HOSTILE_NAN)),
        ):
            w.add_step(
                synthetic_record(
                    HOSTILE_RUN,
                    step,
                    pipeline=pipeline,
                    penalties=penalties,
                    wall_time=wall,
                    nan=step == 40 and pipeline == "default",
                )
            )
        for run in list(STATUS_RUNS)[1:]:
            w.add_step(synthetic_record(run, step, wall_time=wall))
    w.add_event(
        Event(
            HOSTILE_RUN,
            0,
            40,
            now - 60,
            "nonfinite",
            HOSTILE_NAN,
            HOSTILE_MESSAGE,
            severity="critical",
            attributes={"metrics": [HOSTILE_NAN], "penalty": HOSTILE_NAN},
        )
    )
    w.add_event(
        Event(
            HOSTILE_RUN,
            0,
            50,
            now - 50,
            "alert",
            HOSTILE_PENALTY,
            HOSTILE_MESSAGE,
            attributes={"penalty": HOSTILE_PENALTY},
        )
    )
    w.close()
    conn = sqlite3.connect(path, isolation_level=None)
    for run, (status, heartbeat_age) in STATUS_RUNS.items():
        conn.execute(
            "UPDATE runs SET status = ?, updated_at = ? WHERE name = ?",
            (status, now - heartbeat_age, run),
        )
    conn.close()


@pytest.fixture
def status_store(tmp_path) -> pathlib.Path:
    path = tmp_path / "statuses.db"
    write_status_store(path)
    return path


def _status_app(monkeypatch, db) -> AppTest:
    monkeypatch.setenv("PENWATCH_STALE_AFTER", str(STALE_AFTER))
    return _run(monkeypatch, db)


def _markdown_texts(at: AppTest) -> list[str]:
    """The Markdown source of every element that renders Markdown."""
    kinds = ("markdown", "caption", "info", "warning", "error", "success", "title", "subheader")
    return [e.value for kind in kinds for e in at.get(kind)]


@pytest.mark.parametrize(
    "text",
    [
        "**bold** __b__ *i* _i_",
        "<b>tag</b> <script>alert(1)</script> &amp; &#60;",
        "[link](http://x) ![img](http://x/i.png) <http://x> http://x www.x.com a@b.com",
        "$x$ $$y$$ \\(z\\)",
        ":red[x] :smile: :material/home: :blue-background[y]",
        "# heading",
        "- item",
        "1. item",
        "> quote",
        "| a | b |",
        "~~strike~~ `code` ```fence```",
        "back\\slash \\*",
        "    indented code",
        "line one\n# two\n\n- three\r\n===\n",
        "\n  leading\ttab\n\tand space",
        "l1_[x](http://e)",
        "émoji ✓ 日本",
        "",
    ],
)
def test_md_escape_renders_literally(text):
    out = md_escape(text)
    lines = text.replace("\r\n", "\n").split("\n")
    while len(lines) > 1 and not lines[-1]:
        lines.pop()  # trailing line breaks are invisible anyway
    # every ASCII punctuation character of the text is escaped, one line per line
    escaped = out.split("\\\n")
    assert len(escaped) == len(lines)
    for line, original in zip(escaped, lines, strict=True):
        line = re.sub(r"^&#(32|9);", lambda m: chr(int(m.group(1))), line)
        plain, i = [], 0
        while i < len(line):
            if line[i] == "\\":
                assert line[i + 1] in string.punctuation, line
                i += 1
            else:
                assert line[i] not in string.punctuation, line
            plain.append(line[i])
            i += 1
        assert "".join(plain) == original
    # a CommonMark renderer gives back exactly the text: one paragraph, no markup
    markdown_it = pytest.importorskip("markdown_it")
    rendered = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(out)
    if not text:
        assert rendered == ""
        return
    inner = re.fullmatch(r"<p>(.*)</p>\n", rendered, re.S)
    assert inner, rendered
    assert set(re.findall(r"<(/?\w+)", inner.group(1))) <= {"br"}, rendered
    shown = [html.unescape(x) for x in inner.group(1).split("<br />\n")]
    assert shown == lines, rendered


def test_combine_statuses():
    assert combine_statuses(["finished", "running", "crashed"]) == "running"
    assert combine_statuses(["finished", "stopped"]) == "stopped"
    assert combine_statuses(["stopped", "failed", "finished"]) == "failed"
    assert combine_statuses(["failed", "crashed"]) == "crashed"
    assert combine_statuses(["idle"]) == "idle"
    assert combine_statuses([]) == "unknown"


def test_status_note_says_what_each_status_means():
    now = 1e9

    def note(status, process=None, **kw):
        choice = RunChoice(HOSTILE_RUN, (0,), status, 10, now - 300, (status,), (now - 300,))
        return status_note(choice, process, stale_after=60, now=now, **kw)

    assert note("running") is None
    level, text = note("crashed")
    assert level == "error" and "crashed" in text and "5 min ago" in text and "60 s" in text
    assert f"**{md_escape(HOSTILE_RUN)}**" in text and HOSTILE_RUN not in text
    assert note("stopped")[0] == "warning" and "was stopped 5 min ago" in note("stopped")[1]
    assert note("failed")[0] == "error" and "failed" in note("failed")[1]
    assert note("finished")[0] == "info" and "not live" in note("finished")[1]
    assert "Prometheus cannot tell" in note("idle")[1]
    assert note("something-new") is None  # an unknown status is no crash
    # a live multi-process run with an ended process says which one
    choice = RunChoice("mp", (0, 1), "running", 10, now, ("running", "crashed"), (now, now - 120))
    level, text = status_note(choice, None, stale_after=60, now=now)
    assert level == "warning" and "process 1 crashed (2 min ago)" in text
    assert status_note(choice, 0, stale_after=60, now=now) is None
    level, text = status_note(choice, 1, stale_after=60, now=now)
    assert level == "error" and "(process 1) crashed" in text
    # an ended multi-process run: the most alarming status, its own process's age
    choice = RunChoice("mp", (0, 1), "crashed", 10, now, ("finished", "crashed"), (now, now - 600))
    level, text = status_note(choice, None, stale_after=60, now=now)
    assert level == "error" and "heartbeat was 10 min ago" in text
    assert text.endswith("Processes: 0 finished, 1 crashed.")


def test_picker_lists_statuses_and_the_page_says_when_a_run_is_not_live(status_store, monkeypatch):
    at = _status_app(monkeypatch, status_store)
    picker = at.selectbox(key="penwatch_run")
    assert picker.value == HOSTILE_RUN  # the most recently updated
    shown = {label.split(" · ")[-2] for label in picker.options}
    assert shown == {"stopped", "running", "finished", "failed", "crashed"}
    assert f"{HOSTILE_RUN} · stopped · step 59" in picker.options  # plain text, as typed
    assert "crashed-run · crashed · step 59" in picker.options
    expected = {
        HOSTILE_RUN: ("warning", "was stopped"),
        "finished-run": ("info", "finished"),
        "failed-run": ("error", "failed"),
        "crashed-run": ("error", "crashed: it is still marked running"),
    }
    for run, (level, words) in expected.items():
        at = picker.select(run).run()
        assert not at.exception, at.exception
        assert any(words in e.value for e in at.get(level)), (run, _markdown_texts(at))
        assert "(not live)" in at.caption[-1].value
        picker = at.selectbox(key="penwatch_run")
    at = picker.select("live-run").run()
    assert "(live)" in at.caption[-1].value
    banners = [e.value for level in ("info", "warning", "error") for e in at.get(level)]
    assert not any(b.startswith("Run ") for b in banners), banners  # no status note


def test_user_text_is_escaped_in_markdown_and_kept_in_data(status_store, monkeypatch):
    at = _status_app(monkeypatch, status_store)
    texts = _markdown_texts(at)
    hostile = (HOSTILE_RUN, HOSTILE_PIPELINE, HOSTILE_PENALTY, HOSTILE_NAN, HOSTILE_MESSAGE)
    for text in texts:  # never a raw user string inside Markdown
        for h in hostile:
            assert h not in text, (h, text)
    joined = "\n".join(texts)
    assert f"run **{md_escape(HOSTILE_RUN)}**" in at.caption[-1].value
    assert f"first offender **{md_escape(HOSTILE_NAN)}**" in joined
    conflict = md_escape(f"{HOSTILE_PIPELINE}/orthogonality")
    assert f"**{conflict}** conflicts with the task loss" in joined
    assert "was stopped" in joined
    # charts and tables get the names as data, unescaped
    charts = _charts(at)
    _, (contributions,) = charts["Weighted penalty contributions (stacked)"]
    assert f"{HOSTILE_PIPELINE}/{HOSTILE_PENALTY}" in set(contributions["penalty"])
    assert f"default/{HOSTILE_NAN}" in set(contributions["penalty"])
    _, (events,) = charts["Non-finite events and alerts"]
    assert set(events["message"]) == {HOSTILE_MESSAGE}
    assert {HOSTILE_NAN, HOSTILE_PENALTY} == set(events["name"])
    tables = [d.value for d in at.dataframe]
    assert any(HOSTILE_MESSAGE in set(t.get("message", [])) for t in tables)
    # the dominance section names the pipeline of its step as plain text, literally
    assert any(f"pipeline {HOSTILE_PIPELINE});" in t.value for t in at.text)


def test_ended_run_is_read_once_then_left_alone(status_store, monkeypatch):
    source = sources.SQLiteSource(status_store, stale_after=STALE_AFTER)
    calls = []
    original = store.StoreReader.steps
    monkeypatch.setattr(
        store.StoreReader,
        "steps",
        lambda self, *a, **k: calls.append(1) or original(self, *a, **k),
    )
    assert source.snapshot("failed-run", None).headline.step == 59
    assert source.snapshot("failed-run", None).headline.step == 59
    assert len(calls) == 1  # ended: nothing new can come
    source.snapshot("live-run", None)
    source.snapshot("live-run", None)
    assert len(calls) == 3  # live: polled every time
    # the run is resumed (status and heartbeat move): read again, new steps included
    w = store.StoreWriter(status_store, flush_interval=1e9)
    w.open_run(RunInfo("failed-run", 0, "1.0", "cpu", 1, time.time()))
    for r in synthetic_run("failed-run", 5, start=60):
        w.add_step(r)
    w.close()
    snap = source.snapshot("failed-run", None)
    assert len(calls) == 4 and snap.headline.step == 64 and snap.headline.live


def test_stale_after_from_args_and_env():
    default = sources.Config.from_env([], env={})
    assert default.stale_after == thresholds.STALE_AFTER_SECONDS
    assert sources.Config.from_env([], env={"PENWATCH_STALE_AFTER": "5"}).stale_after == 5.0
    c = sources.Config.from_env(["--stale-after", "7.5"], env={"PENWATCH_STALE_AFTER": "5"})
    assert c.stale_after == 7.5
    for bad in ("0", "-1", "inf", "nan", "soon"):
        with pytest.raises(ValueError, match=r"PENWATCH_STALE_AFTER must be a finite") as info:
            sources.Config.from_env([], env={"PENWATCH_STALE_AFTER": bad})
        assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match=r"--refresh / PENWATCH_REFRESH_SECONDS.*'x'"):
        sources.Config.from_env(["--refresh", "x"], env={})
    assert math.isclose(sources.make_source(c).stale_after, 7.5)


def test_bad_stale_after_is_a_message_on_the_page(monkeypatch, tmp_path):
    monkeypatch.setenv("PENWATCH_STALE_AFTER", "<b>soon</b>")
    at = _run(monkeypatch, tmp_path / "x.db")
    (error,) = at.error
    assert md_escape("PENWATCH_STALE_AFTER") in error.value
    assert md_escape("'<b>soon</b>'") in error.value


def test_comparison_of_two_runs_overlays_loss_penalties_shares_durations(stores, monkeypatch):
    at = _run(monkeypatch, stores["multirun"])
    picker = at.selectbox(key="penwatch_run")
    other = "a" if picker.value == "b" else "b"
    at = at.multiselect(key="penwatch_compare").select(other).run()
    assert not at.exception, at.exception
    charts = _charts(at)
    for title in (
        "Compared: base loss and total penalty",
        "Compared: weighted penalties",
        "Compared: share of total penalty",
        "Compared: device time per step",
    ):
        assert title in charts, (title, list(charts))
    spec, (data,) = charts["Compared: base loss and total penalty"]
    assert set(data["run"]) == {"a", "b"} and spec["encoding"]["color"]["field"] == "run"
    assert any(s.value.startswith("Comparison of") for s in at.subheader)
    table = at.dataframe[0].value
    assert list(table["run"]) == [picker.value, other]


def test_every_label_is_shown_whole(stores, monkeypatch):
    at = _run(monkeypatch, stores["normal"])
    for title, (spec, _) in _charts(at).items():
        layers = spec.get("layer", [spec])
        for layer in layers:
            for channel, enc in layer.get("encoding", {}).items():
                if channel in ("color", "shape", "strokeDash") and enc.get("legend") is not None:
                    assert enc["legend"].get("labelLimit") == 0, (title, channel)
                if channel == "y" and enc.get("type") == "nominal":
                    assert enc["axis"]["labelLimit"] == 0, title
                    assert enc["axis"]["labelOverlap"] is False, title


def test_an_ended_run_stops_refreshing_and_a_live_one_does_not(status_store, monkeypatch):
    monkeypatch.setenv("PENWATCH_STALE_AFTER", str(STALE_AFTER))
    at = _run(monkeypatch, status_store)
    note = "Not refreshing: the runs shown have ended."
    assert any(c.value.startswith(note) for c in at.caption)  # the freshest run: stopped
    at = at.selectbox(key="penwatch_run").select("live-run").run()
    assert not at.exception and not any(c.value.startswith(note) for c in at.caption)


# --- the dominance section (SPEC §12): a real small model's diagnostics steps ----------

DOMINANCE_RUN = "dominance"


@pytest.fixture(scope="module")
def dominance_store(tmp_path_factory):
    """An MLP with an L1 activity penalty at weight 5 under Adam, diagnostics every 5
    steps (Gram matrix, per-layer norms, update shares, suggestions), written by the
    SQLite sink; with the diagnostics records the monitor handed to its sinks."""
    import optax
    from test_dominance_answers import _l1_mean, _mlp_setup, _mse

    import penwatch as pw

    path = tmp_path_factory.mktemp("dominance") / "dominance.db"
    model, params, batch = _mlp_setup()
    init, step = pw.training.build_activity_train_step(
        model, _mse, {"hidden": (_l1_mean, 5.0)}, optax.adam(0.01), diagnostics_every=5
    )
    records: list[StepRecord] = []
    state = init(params)
    sinks = [pw.sinks.Callback(records.append), pw.sinks.SQLite(path)]
    with pw.Monitor(DOMINANCE_RUN, sinks=sinks) as monitor:
        for i in range(21):
            state, metrics = step(state, batch)
            monitor.record(i, metrics)
    diag = {r.step: r for r in records if r.gram() is not None}
    assert sorted(diag) == [0, 5, 10, 15, 20]
    return path, diag


def _dataframe(at: AppTest, column: str):
    (frame,) = [d.value for d in at.dataframe if column in d.value.columns]
    return frame


def test_reader_reads_diagnostics_steps_by_index(dominance_store):
    path, diag = dominance_store
    with store.StoreReader(path) as reader:
        (run_id,) = [r.id for r in reader.runs() if r.name == DOMINANCE_RUN]
        assert reader.steps_with([run_id], "grad_gram[base,hidden]").tolist() == [20, 15, 10, 5, 0]
        assert reader.steps_with([run_id], "grad_gram[base,hidden]", limit=2).tolist() == [20, 15]
        assert reader.steps_with([run_id], "no_such_key").size == 0
        ((rid, pipeline, values),) = reader.step_values([run_id], 15)
        assert pipeline == "default"
        assert (rid, values) == (run_id, diag[15].values)
        assert reader.step_values([run_id], 10_000) == []
        with pytest.raises(ValueError, match="limit must be an int >= 1, got 0"):
            reader.steps_with([run_id], "loss", limit=0)


def test_reader_steps_with_merges_processes_and_walks_the_index(stores):
    with store.StoreReader(stores["multiproc"]) as reader:
        ids = sorted(r.id for r in reader.runs() if r.name == "mp")  # 200 and 150 steps
        got = reader.steps_with(ids, "base_grad_share", limit=4).tolist()
        assert got == [199, 198, 197, 196]
        both = reader.steps_with(ids, "base_grad_share", limit=1000)
        assert both.size == 350 and both.tolist() == sorted(both.tolist(), reverse=True)
        # each run's steps are walked back along the (run_id, step) index, never sorted
        # whole: the plan of every statement the reader ran (bound values expanded)
        ran: list[str] = []
        reader._conn.set_trace_callback(ran.append)
        reader.steps_with(ids, "base_grad_share", limit=4)
        reader.step_values(ids, 120)
        reader._conn.set_trace_callback(None)
        plans = [
            " ".join(str(r) for r in reader._conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
            for sql in ran
            if "FROM steps" in sql
        ]
        assert len(plans) == 3 and all("steps_run_step" in p for p in plans), plans
        assert all("TEMP B-TREE" not in p for p in plans[:2]), plans


def test_dominance_section_answers_in_words_then_what_if(dominance_store, monkeypatch):
    from penwatch.dashboard import _dominance as dom

    from penwatch.diagnostics import what_if

    path, diag = dominance_store
    at = _run(monkeypatch, path)
    latest = dom.step_from_values(20, diag[20].values)
    sentences = dom.sentences(latest)
    assert sentences[0].startswith("hidden ")  # weight 5: the penalty is named
    infos = [i.value for i in at.info]
    for sentence in sentences:  # the answer in words, escaped, before the sliders
        assert md_escape(sentence) in infos
    # the what-if table at the current weight: the step as recorded
    table = _dataframe(at, "what-if share").set_index("term")
    for t in ("base", "hidden"):
        assert table.loc[t, "what-if share"] == pytest.approx(
            diag[20].values[f"{t}_grad_share"], rel=1e-4, abs=1e-6
        )
    # move the slider: the shares are what pw.diagnostics.what_if gives for that weight
    slider = at.select_slider(key=f"penwatch_whatif:{DOMINANCE_RUN}:20:hidden")
    assert slider.value == 5.0
    at = slider.set_value(0.5).run()
    assert not at.exception, at.exception
    ref = what_if(diag[20], {"hidden": 0.5})
    table = _dataframe(at, "what-if share").set_index("term")
    assert table.loc["hidden", "what-if weight"] == 0.5
    for t in ("base", "hidden"):
        assert table.loc[t, "what-if share"] == pytest.approx(ref.grad_share[t], rel=1e-9)
        assert table.loc[t, "what-if cosine"] == pytest.approx(ref.grad_cosine[t], rel=1e-9)
    assert table.loc["hidden", "what-if share"] != pytest.approx(
        diag[20].values["hidden_grad_share"], rel=1e-3
    )
    # the term × layer heat map, every label shown; gradient vs update shares
    spec, (cells,) = _charts(at)["Where each term acts (step 20)"]
    assert {(r.term, r.group) for r in cells.itertuples()} == {
        (t, g) for t in ("base", "hidden") for g in ("dense1", "dense2")
    }
    for layer in spec["layer"]:
        for channel in ("x", "y"):
            assert layer["encoding"][channel]["axis"]["labelLimit"] == 0
    shares = _dataframe(at, "update share").set_index("term")
    assert shares.loc["hidden", "update share"] == pytest.approx(
        diag[20].values["hidden_update_share"], rel=1e-6
    )
    # pick an earlier diagnostics step: its own words and sliders
    at = at.select_slider(key=f"penwatch_diag_step:{DOMINANCE_RUN}:None").set_value(10).run()
    assert not at.exception, at.exception
    infos = [i.value for i in at.info]
    for sentence in dom.sentences(dom.step_from_values(10, diag[10].values)):
        assert md_escape(sentence) in infos
    assert at.select_slider(key=f"penwatch_whatif:{DOMINANCE_RUN}:10:hidden").value == 5.0
    assert "Where each term acts (step 10)" in _charts(at)


def test_dominance_step_picker_follows_a_live_run_until_a_step_is_picked(
    dominance_store, tmp_path, monkeypatch
):
    import shutil

    path, diag = dominance_store
    db = tmp_path / "live.db"
    shutil.copy(path, db)

    def add(step: int) -> None:  # one more diagnostics step, the latest's values
        w = store.StoreWriter(db, flush_interval=1e9)
        w.open_run(RunInfo(DOMINANCE_RUN, 0, "1.0", "cpu", 1, time.time()))
        w.add_step(
            StepRecord(DOMINANCE_RUN, 0, step, "default", time.time(), dict(diag[20].values))
        )
        w.close()

    at = _run(monkeypatch, db)
    key = f"penwatch_diag_step:{DOMINANCE_RUN}:None"
    assert at.select_slider(key=key).value == 20
    add(25)
    at = at.run()
    assert at.select_slider(key=key).value == 25  # the default follows the latest
    at = at.select_slider(key=key).set_value(10).run()
    add(30)
    at = at.run()
    assert at.select_slider(key=key).value == 10  # a picked step stays picked
    assert md_escape(_sentences_of(diag[10])[0]) in [i.value for i in at.info]


def _sentences_of(record: StepRecord) -> list[str]:
    from penwatch.dashboard import _dominance as dom

    return dom.sentences(dom.step_from_values(record.step, record.values))


def test_dominance_section_shows_hostile_term_names_as_text(tmp_path, monkeypatch):
    from test_dashboard_dominance import _balance_values

    name = "*l1* <b>x</b> $m$"
    values = {k.replace("hidden", name): v for k, v in _balance_values().items()}
    db = tmp_path / "hostile.db"
    _write(db, {("h", 0): [StepRecord("h", 0, 12, "default", time.time(), values)]})
    at = _run(monkeypatch, db)
    texts = _markdown_texts(at) + [s.label for s in at.select_slider]
    assert not [t for t in texts if name in t]  # never raw inside Markdown
    sentence = f"{name} holds the task back: ‖g‖ ratio 0.85, cosine -0.9"
    assert any(i.value.startswith(md_escape(sentence)) for i in at.info)
    (slider,) = at.select_slider
    assert slider.label.startswith(md_escape(name)) and slider.value == 5.0
    table = _dataframe(at, "what-if share")
    assert name in set(table["term"])  # data, unescaped
