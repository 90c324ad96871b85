"""Dashboard refresh time on a 10^6-step store (SPEC §9: cold ≤ 2 s, live ≤ 0.2 s).

The store is written through the store's writer with the store's synthetic records
(``penwatch.store._synthetic``: four penalties with input-gradient norms, gradient
diagnostics for five terms, a NaN episode and a loss spike). Measured:

* ``cold``: a new browser session's first refresh (a fresh source reads the rollups and
  derives every figure) — bar ≤ 2 s;
* ``live``: one refresh of an open session after 100 new steps were written — bar ≤ 0.2 s;
* ``app``: one full Streamlit script run (AppTest) of an open session — reading, building
  every chart and rendering the page — which is what the browser waits for (reported).

``PENWATCH_BENCH_DASHBOARD_STEPS`` sets another run length (a quick check at a small
size; the bars hold for the full 10^6 steps).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time

from benchmarks._harness import Report, time_call

STEPS = int(os.environ.get("PENWATCH_BENCH_DASHBOARD_STEPS", 1_000_000))


def _store(path: pathlib.Path) -> None:
    from penwatch.schema import RunInfo
    from penwatch.store import StoreWriter
    from penwatch.store._synthetic import synthetic_run

    w = StoreWriter(path, batch_size=4096, flush_interval=1e9)
    w.open_run(RunInfo("long", 0, "bench", "cpu", 1, time.time()))
    for r in synthetic_run("long", STEPS, nan_at=(1000, 1001), spike_at=(STEPS // 2 + 7,)):
        w.add_step(r)
    w.close()


def run(report: Report) -> None:
    from penwatch.dashboard.sources import SQLiteSource
    from streamlit.testing.v1 import AppTest

    from penwatch.store import StoreWriter
    from penwatch.store._synthetic import synthetic_run

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "long.db"
        t0 = time.perf_counter()
        _store(path)
        print(
            f"  wrote {STEPS:,} steps in {time.perf_counter() - t0:.1f}s "
            f"({path.stat().st_size / 1e6:.0f} MB)"
        )

        cold = time_call(lambda: SQLiteSource(path).snapshot("long", None), repeats=5, warmup=1)
        report.add(
            f"dashboard cold refresh, {STEPS:,} steps",
            cold,
            unit="s",
            bar="<= 2 s",
            passed=cold <= 2.0,
        )

        source = SQLiteSource(path)
        source.snapshot("long", None)
        writer = StoreWriter(path, flush_interval=1e9)
        start = [STEPS]

        def live() -> None:
            for r in synthetic_run("long", 100, start=start[0]):
                writer.add_step(r)
            writer.flush()
            start[0] += 100
            t = time.perf_counter()
            source.snapshot("long", None)
            samples.append(time.perf_counter() - t)

        samples: list[float] = []
        for _ in range(10):
            live()
        samples.sort()
        report.add(
            "dashboard live refresh (+100 steps)",
            samples[len(samples) // 2],
            unit="s",
            bar="<= 0.2 s",
            passed=samples[len(samples) // 2] <= 0.2,
        )

        os.environ["PENWATCH_DB"] = str(path)
        app = pathlib.Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
        at = AppTest.from_file(str(app), default_timeout=120).run()
        assert not at.exception, at.exception
        full = time_call(lambda: at.run(), repeats=5, warmup=1)
        report.add("dashboard page refresh (AppTest, reported)", full, unit="s")
        writer.close()
