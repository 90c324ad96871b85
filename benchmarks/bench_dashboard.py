"""Dashboard refresh time on a 200,000-step store (bar: about 1 s per refresh).

The store is written through the SQLite sink's writer with full synthetic records (four
penalties with input-gradient norms, gradient diagnostics for five terms: 43 rows per
step, 8.6 million metric rows). Measured:

* ``cold``: a new browser session's first refresh (a fresh source reads the rollups);
* ``live``: one refresh of an open session after 100 new steps were written;
* ``app``: one full Streamlit script run (AppTest) of an open session — reading, building
  every chart and rendering the page — which is what the browser waits for.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time

from benchmarks._harness import Report, time_call

STEPS = 200_000


def _store(path: pathlib.Path) -> None:
    from penwatch.schema import RunInfo
    from penwatch.store import StoreWriter
    from penwatch.store._synthetic import synthetic_run

    w = StoreWriter(path, batch_size=4096, flush_interval=1e9)
    w.open_run(RunInfo("long", 0, "bench", "cpu", 1, time.time()))
    for r in synthetic_run("long", STEPS, nan_at=(1000,), spike_at=(123_457,)):
        w.add_step(r)
    w.close()


def run(report: Report) -> None:
    from streamlit.testing.v1 import AppTest

    from penwatch.dashboard.sources import SQLiteSource
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
            "dashboard cold refresh, 200k steps", cold, unit="s", bar="<= 1 s", passed=cold <= 1.0
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
            bar="<= 1 s",
            passed=samples[len(samples) // 2] <= 1.0,
        )

        os.environ["PENWATCH_DB"] = str(path)
        app = pathlib.Path(__file__).resolve().parents[1] / "penwatch" / "dashboard" / "app.py"
        at = AppTest.from_file(str(app), default_timeout=120).run()
        assert not at.exception, at.exception
        full = time_call(lambda: at.run(), repeats=5, warmup=1)
        report.add(
            "dashboard page refresh (AppTest)", full, unit="s", bar="<= 1 s", passed=full <= 1.0
        )
        writer.close()
