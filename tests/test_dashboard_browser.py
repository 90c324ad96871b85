"""A real headless Chromium loads the running dashboard.

During a live training run: the live writer is ``penwatch demo --no-dashboard`` (E's
CLI: a real instrumented JAX training run writing the SQLite store through the monitor).
Chromium is Debian's ``/usr/bin/chromium`` driven by Playwright; the test checks that the
numbers and charts appear and that the step number increases between two reads, and
takes a screenshot (copied to ``docs/dashboard.png`` when ``PENWATCH_UPDATE_SCREENSHOT=1``).

On a store with a run in every status whose names look like Markdown and HTML: the
rendered page shows those names literally (no bold, tag, link, math, coloured text or
emoji made from them), the picker lists every status, and the page says when the
selected run is stopped or crashed.

Without Chromium it FAILS when ``CI=true`` and skips loudly otherwise.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_dashboard import (
    HOSTILE_MESSAGE,
    HOSTILE_NAN,
    HOSTILE_PENALTY,
    HOSTILE_PIPELINE,
    HOSTILE_RUN,
    STALE_AFTER,
    write_status_store,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "dashboard.png"

pytestmark = [pytest.mark.integration, pytest.mark.concurrent]


def _require_browser():
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append(f"{CHROMIUM} (Debian package 'chromium': `make system-deps` as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright Python package (`pip install -e '.[dev]'`)")
        sync_playwright = None
    if missing:
        message = "browser test cannot run: missing " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip("LOUD SKIP (would fail in CI): " + message)
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _start_app(env: dict[str, str], log) -> tuple[subprocess.Popen, int]:
    """``streamlit run dashboard/app.py`` on a free local port (its own process group)."""
    port = _free_port()
    app = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(ROOT / "dashboard" / "app.py"),
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--browser.gatherUsageStats",
            "false",
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return app, port


def _open(page, app: subprocess.Popen, port: int, log: pathlib.Path) -> None:
    """Load the page once the server answers (at most a minute)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            page.goto(f"http://127.0.0.1:{port}/", timeout=10_000)
            return
        except Exception:
            assert app.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the dashboard never answered"
            time.sleep(0.3)


def _step(page) -> int:
    """The headline "Step" number (found by its label, not by position)."""
    label = page.locator("[data-testid='stMetricLabel']", has_text=re.compile(r"^\s*Step\s*$"))
    metric = page.locator("[data-testid='stMetric']", has=label).first
    deadline = time.monotonic() + 30
    while True:  # the element may be swapped by a refresh while we read it
        try:
            text = metric.locator("[data-testid='stMetricValue']").inner_text(timeout=3_000)
            return int(re.sub(r"[^\d]", "", text))
        except Exception:
            if time.monotonic() > deadline:
                raise
            page.wait_for_timeout(200)


def test_live_dashboard_in_chromium(tmp_path):
    sync_playwright = _require_browser()
    db = tmp_path / "live.db"
    env = dict(
        os.environ,
        PENWATCH_DB=str(db),
        PENWATCH_REFRESH_SECONDS="1",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
    )
    penwatch = shutil.which("penwatch", path=str(pathlib.Path(sys.executable).parent))
    assert penwatch, "the penwatch CLI is not installed in this environment"
    logs = {n: open(tmp_path / f"{n}.log", "w") for n in ("demo", "app")}  # noqa: SIM115
    demo = subprocess.Popen(
        [
            penwatch,
            "demo",
            "--no-dashboard",
            "--db",
            str(db),
            "--run",
            "browser-demo",
            "--steps",
            "1500",  # about 30 s: live for the first reads, then it finishes
            "--step-delay",
            "0.02",
            "--metrics-port",
            "0",
            "--inject-nan-at",
            "30",
        ],
        env=env,
        cwd=tmp_path,
        stdout=logs["demo"],
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    app, port = _start_app(env, logs["app"])
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 2350})
            _open(page, app, port, tmp_path / "app.log")
            # numbers appear once the demo has written its first steps
            page.wait_for_selector("[data-testid='stMetricValue']", timeout=90_000)
            headline = [
                "Step",
                "Base loss",
                "Total penalty",
                "Penalty share of loss",
                "Non-finite steps",
                "Non-finite episodes",
                "Open alerts",
            ]
            deadline = time.monotonic() + 60
            while True:  # the page renders progressively: wait for the whole headline
                labels = page.locator("[data-testid='stMetricLabel']").all_inner_texts()
                if labels[:7] == headline:
                    break
                assert time.monotonic() < deadline, labels
                page.wait_for_timeout(300)
            first = _step(page)
            deadline = time.monotonic() + 45
            while (second := _step(page)) <= first or second < 60:
                assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
                assert time.monotonic() < deadline, f"step stuck at {second}"
                page.wait_for_timeout(500)
            assert second > first
            # at least six charts: a live page re-renders element by element, so a count
            # taken once can catch a refresh mid-way (5 of 6); wait for the six instead
            charts = page.locator("[data-testid='stVegaLiteChart']")
            deadline = time.monotonic() + 30
            while charts.count() < 6:
                assert time.monotonic() < deadline, f"{charts.count()} charts"
                page.wait_for_timeout(300)
            page.locator("canvas, svg").first.wait_for(timeout=10_000)
            text = _wait_for_text(
                page,
                "Weighted penalty contributions",
                "Base loss and total penalty",
                "Device time per step, percentiles",
                "Non-finite events and alerts",
            )
            assert "Traceback" not in text
            # the run finishes: the page says so once and stops refreshing (the picture
            # of a finished run is never caught mid-refresh, faded)
            assert demo.wait(180) == 0, (tmp_path / "demo.log").read_text()[-3000:]
            _wait_for_text(
                page,
                "Not refreshing: the runs shown have ended.",
                "status finished (not live)",
                "Run browser-demo finished",
            )
            deadline = time.monotonic() + 30
            while _step(page) != 1499:  # the page renders element by element
                assert time.monotonic() < deadline, _step(page)
                page.wait_for_timeout(300)
            page.wait_for_timeout(3000)  # longer than a refresh: nothing changes any more
            assert _step(page) == 1499
            assert page.locator("[data-stale='true']").count() == 0
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            browser.close()
        shot = tmp_path / "dashboard.png"
        assert shot.stat().st_size > 50_000, "the screenshot is (nearly) blank"
        if os.environ.get("PENWATCH_UPDATE_SCREENSHOT"):  # refresh the README's picture
            shutil.copyfile(shot, SCREENSHOT)
            shot = SCREENSHOT
        print(f"live writer: penwatch demo; steps read {first} -> {second}; screenshot {shot}")
    finally:
        _stop(demo)
        _stop(app)
        for f in logs.values():
            f.close()


def _wait_for_text(page, *texts: str, timeout: float = 60) -> str:
    """The page's text once it contains every one of ``texts``.

    Streamlit renders a rerun element by element, so one text being there says
    nothing about its neighbours: wait for all that the caller reads.
    """
    deadline = time.monotonic() + timeout
    while True:
        body = page.inner_text("body")
        missing = [text for text in texts if text not in body]
        if not missing:
            return body
        assert time.monotonic() < deadline, f"{missing!r} never appeared; the page says:\n{body}"
        page.wait_for_timeout(300)


def _picker_options(page, widget: str = "stSelectbox") -> list[str]:
    """Open the run picker (or another drop-down) and read its options, leaving it open."""
    options = page.locator("[role='option']")
    for attempt in range(5):  # a click that lands while the page scrolls may not open it
        page.locator(f"[data-testid='{widget}']").first.click()
        try:
            options.first.wait_for(timeout=3_000)
            break
        except Exception:
            if attempt == 4:
                raise
            page.keyboard.press("Escape")
    return options.all_inner_texts()


def test_statuses_and_user_text_in_chromium(tmp_path):
    sync_playwright = _require_browser()
    db = tmp_path / "statuses.db"
    write_status_store(db)
    env = dict(
        os.environ,
        PENWATCH_DB=str(db),
        PENWATCH_REFRESH_SECONDS="2",
        PENWATCH_STALE_AFTER=str(STALE_AFTER),
    )
    log = open(tmp_path / "app.log", "w")  # noqa: SIM115
    app, port = _start_app(env, log)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 3000})
            _open(page, app, port, tmp_path / "app.log")
            # the freshest run is selected: stopped, with names that look like markup
            literal = [
                f"Run {HOSTILE_RUN} was stopped",  # the status banner
                f"run {HOSTILE_RUN} · all processes · status stopped (not live)",  # caption
                f"{HOSTILE_PIPELINE}/orthogonality conflicts with the task loss",
                f"first offender {HOSTILE_NAN} (nan)",
            ]
            body = _wait_for_text(page, *literal)
            # nothing was made from the names: no tag, link, heading, math, colour, emoji
            main = page.locator("[data-testid='stMain']")
            for selector in ("b", "i", "script", "a[href^='http']", ".katex"):
                assert main.locator(selector).count() == 0, selector
            for tag in ("strong", "em", "h1", "h2", "h3", "h4", "h5", "h6"):
                texts = main.locator(tag).all_inner_texts()
                assert not {"bold", "h", "u", "tag", "pipe", "b"} & set(texts), (tag, texts)
            assert "😄" not in body and "<b>tag</b>" in body and ":red[b] $m$ :smile:" in body
            colored = main.locator("[data-testid='stAlert'] span[style*='color']")
            assert colored.count() == 0, colored.all_inner_texts()
            # table cells hold the names and the event message as typed
            frames = page.locator("[data-testid='stDataFrame']")
            frames.last.scroll_into_view_if_needed()
            deadline = time.monotonic() + 30
            while True:
                cells = frames.last.locator("[role='gridcell']").all_inner_texts()
                if HOSTILE_MESSAGE in cells:
                    break
                assert time.monotonic() < deadline, cells
                page.wait_for_timeout(300)
            assert {HOSTILE_NAN, HOSTILE_PENALTY} <= set(cells)
            # the picker lists every run with its status, names as typed
            options = _picker_options(page)
            for option in (
                f"{HOSTILE_RUN} · stopped · step 59",
                "live-run · running · step 59",
                "finished-run · finished · step 59",
                "failed-run · failed · step 59",
                "crashed-run · crashed · step 59",
            ):
                assert option in options, (option, options)
            # a crashed run says so
            page.locator("[role='option']", has_text="crashed-run").click()
            body = _wait_for_text(
                page,
                "crashed: it is still marked running",
                "run crashed-run · all processes · status crashed (not live)",
                f"limit {STALE_AFTER:g} s",
            )
            assert "Traceback" not in body
            page.screenshot(path=str(tmp_path / "statuses.png"), full_page=True)
            browser.close()
        print(f"statuses and user text checked; screenshot {tmp_path / 'statuses.png'}")
    finally:
        _stop(app)
        log.close()


TRUTH_RUN = f"{HOSTILE_RUN} · nan"
BASELINE_RUN = "baseline <b>w=0</b>"
NAN_STEPS = (1950, 1951, 1952)


def write_truth_store(path: pathlib.Path) -> dict[str, str]:
    """A run with a NaN episode, a dominating term and hostile names, and a second run.

    Returns the run's term labels (``pipeline/term``: two pipelines) by term.
    """
    from penwatch import store
    from penwatch.schema import Event, RunInfo
    from penwatch.store._synthetic import synthetic_record

    now = time.time()
    w = store.StoreWriter(path, batch_size=5000, flush_interval=1e9)
    for run in (BASELINE_RUN, TRUTH_RUN):
        w.open_run(RunInfo(run, 0, "1.0", "cpu", 1, now - 300))
    pipelines = ((HOSTILE_PIPELINE, (HOSTILE_PENALTY, "orthogonality")), ("default", ("l2",)))
    for step in range(1900, 2100):
        wall = now - 300 + (step - 1900)
        w.add_step(synthetic_record(BASELINE_RUN, step, penalties=("l2",), wall_time=wall))
        for pipeline, penalties in pipelines:
            w.add_step(
                synthetic_record(
                    TRUTH_RUN,
                    step,
                    pipeline=pipeline,
                    penalties=penalties,
                    wall_time=wall,
                    nan=step in NAN_STEPS and pipeline == "default",
                )
            )
    w.add_event(
        Event(
            TRUTH_RUN,
            0,
            NAN_STEPS[0],
            now - 250,
            "nonfinite",
            "NonFinite",
            HOSTILE_MESSAGE,
            severity="critical",
            attributes={"penalty": "l2", "capsule": "/caps/<b>1950</b>.npz"},
        )
    )
    w.add_event(
        Event(
            TRUTH_RUN,
            0,
            2020,
            now - 180,
            "alert",
            "GradientDominance",
            "default/l2 dominates",
            attributes={"penalty": "default/l2"},
        )
    )
    w.close()
    return {
        term: f"{pipeline}/{term}"
        for pipeline, penalties in pipelines
        for term in ("base", *penalties)
    }


_VISIBLE_TEXTS = """(chart) => {
    const svg = chart.querySelector("svg");
    const box = chart.getBoundingClientRect(), own = svg.getBoundingClientRect();
    const left = Math.max(box.left, own.left), right = Math.min(box.right, own.right);
    const top = Math.max(box.top, own.top), bottom = Math.min(box.bottom, own.bottom);
    return [...svg.querySelectorAll("text")].filter((t) => {
        const b = t.getBoundingClientRect();
        return b.width > 0 && b.left >= left - 1 && b.right <= right + 1
            && b.top >= top - 1 && b.bottom <= bottom + 1;
    }).map((t) => t.textContent);
}"""


def _svg_texts(page, title: str) -> list[str]:
    """The texts Vega drew (SVG) *inside the visible box* of the chart titled ``title``:
    axis labels and legend entries that a user can read, not ones clipped away."""
    title_text = page.locator(f"svg text:text-is('{title}')")
    chart = page.locator("[data-testid='stVegaLiteChart']", has=title_text).first
    deadline = time.monotonic() + 30
    while True:  # a live page redraws its charts: read again when one is swapped under us
        try:
            chart.scroll_into_view_if_needed(timeout=10_000)
            chart.locator("svg text").first.wait_for(timeout=10_000)
            return chart.evaluate(_VISIBLE_TEXTS)
        except Exception:
            if time.monotonic() > deadline:
                raise
            page.wait_for_timeout(300)


def test_a_truthful_page_in_chromium(tmp_path):
    """NaN episode, dominance, hostile names: every label, the first non-finite step, text
    as text, and two runs compared — read from the page Chromium rendered."""
    sync_playwright = _require_browser()
    db = tmp_path / "truth.db"
    labels = write_truth_store(db)
    env = dict(os.environ, PENWATCH_DB=str(db), PENWATCH_REFRESH_SECONDS="2")
    log = open(tmp_path / "app.log", "w")  # noqa: SIM115
    app, port = _start_app(env, log)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 3200})
            _open(page, app, port, tmp_path / "app.log")
            _picker_options(page)
            page.locator("[role='option']", has_text="· nan").click()
            first = f"{NAN_STEPS[0]:,}"
            body = _wait_for_text(
                page,
                "Needs attention",
                f"Non-finite values: 3 non-finite steps in 1 episode; the first at step {first}.",
                f"Dominance: {labels['l2']} dominates the gradient",
                f"First non-finite step: {first}",
                f"run {TRUTH_RUN} · all processes",
                "Base loss",
                "Dominance: gradients per term",
            )
            # the page leads with what needs attention, in words, before the numbers and charts
            assert body.index("Needs attention") < body.index("Non-finite values: ")
            assert body.index("Non-finite values: ") < body.index("Base loss")
            assert body.index("Base loss") < body.index("Dominance: gradients per term")
            # the dominance section answers in words first, for the latest diagnostics step,
            # and says where it read it, the hostile pipeline name as typed
            body = _wait_for_text(
                page,
                "orthogonality pushes against the task, weakly: ‖g‖ ratio 0.23, cosine -0.8",
                f"Step 2,099 (process 0, pipeline {HOSTILE_PIPELINE}); 200 diagnostics steps",
            )
            assert body.index("Dominance: gradients per term") < body.index("pushes against")
            # text is text: names and messages shown as typed, nothing made from them
            main = page.locator("[data-testid='stMain']")
            for selector in ("b", "i", "script", "a[href^='http']", ".katex"):
                assert main.locator(selector).count() == 0, selector
            # every term's label is drawn whole, on the bars and in the legends
            wanted = set(labels.values())
            bars = _svg_texts(page, "Latest gradient share per term")
            assert wanted <= set(bars), (wanted - set(bars), bars)
            legend = _svg_texts(page, "Gradient norm per term (log scale)")
            assert wanted <= set(legend), (wanted - set(legend), legend)
            shares = _svg_texts(page, "Share of total penalty (latest)")
            penalties = {labels[HOSTILE_PENALTY], labels["orthogonality"], labels["l2"]}
            assert penalties <= set(shares), (penalties - set(shares), shares)
            assert not [t for t in bars + legend + shares if t.endswith("…")]
            page.screenshot(path=str(tmp_path / "truth.png"), full_page=True)
            durations = _svg_texts(page, "Device time per step, percentiles (recent steps)")
            assert {"p50", "p90", "p99"} <= set(durations), durations
            timeline = _svg_texts(page, "Non-finite events and alerts")
            assert {"NonFinite", "GradientDominance", "critical", "warning"} <= set(timeline)
            # counts of steps and episodes, and the jump to the first non-finite step
            metrics = dict(
                zip(
                    page.locator("[data-testid='stMetricLabel']").all_inner_texts(),
                    page.locator("[data-testid='stMetricValue']").all_inner_texts(),
                    strict=False,
                )
            )
            assert metrics["Non-finite steps"] == "3", metrics
            assert metrics["Non-finite episodes"] == "1", metrics
            page.get_by_role("button", name=f"Jump to step {first}").click()
            _wait_for_text(page, f"Charts show steps 1,750–2,150 around step {first}.")
            # the capsule of the NaN episode is shown, as text
            _wait_for_text(page, f"step {NAN_STEPS[0]}: capsule /caps/<b>1950</b>.npz")
            # two runs compared
            _picker_options(page, "stMultiSelect")
            page.locator("[role='option']", has_text="baseline").click()
            page.keyboard.press("Escape")
            _wait_for_text(page, "Comparison of", BASELINE_RUN)
            compared = _svg_texts(page, "Compared: base loss and total penalty")
            assert {TRUTH_RUN, BASELINE_RUN, "base loss", "total penalty"} <= set(compared)
            for title in (
                "Compared: weighted penalties",
                "Compared: share of total penalty",
                "Compared: device time per step",
            ):
                assert _svg_texts(page, title)
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
            browser.close()
        print(f"truthful page checked; screenshots {tmp_path / 'truth.png'}, compare.png")
    finally:
        _stop(app)
        log.close()
