"""How every cost grows with its work (SPEC section 9), drawn as PNG plots.

Four sweeps, each one plot (``docs/img/scaling_*.png``; ``bench-results/`` in quick
mode) and the curves in ``bench-results/scaling.json``:

* **penalties per pipeline** (2 → 64, element-wise built-ins cycled, ``[256, 64]``
  input): jitted ``compute_total``, ``compute`` (all metrics), ``compute`` with
  input-gradient norms, and a plain ``value_and_grad`` of the total;
* **input size** (2^10 → 2^24 elements, ``[n/256, 256]`` log-probabilities, the five
  element-wise penalties): the same four;
* **metrics per record** (10 → 1,000 keys in one packed ``pw.Metrics``, Prometheus +
  SQLite sinks): ``Monitor.record`` on the training thread (median) and the process CPU
  per record (training thread and worker together, recorded back to back, ``close()``
  included);
* **run length in the store** (10^4 → 10^6 steps of synthetic records written through
  ``StoreWriter``): write time per step, bytes per step, and the dashboard source's cold
  refresh (a fresh ``SQLiteSource``) and live refresh (+100 steps).

Rows: the largest point of each sweep (informative), plus the SPEC bars on the dashboard
refresh when the sweep reaches 10^6 steps (cold ≤ 2 s, live ≤ 0.2 s).
"""

from __future__ import annotations

import json
import pathlib
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import penwatch as pw
from benchmarks._harness import Report, machine, quick, time_call, time_interleaved

QUICK = quick()
PENALTIES = (2, 4, 8, 16) if QUICK else (2, 4, 8, 16, 32, 64)
SIZES = tuple(2**e for e in ((10, 12, 14, 16, 18) if QUICK else range(10, 25, 2)))
METRICS = (10, 30, 100, 300) if QUICK else (10, 30, 100, 300, 1000)
RUN_LENGTHS = (10_000, 30_000) if QUICK else (10_000, 30_000, 100_000, 300_000, 1_000_000)
REPEATS = 5 if QUICK else 21
RECORDS = 300 if QUICK else 3000

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the docs' figures come from full runs only; quick runs draw next to their results
PLOTS = ROOT / ("bench-results" if QUICK else "docs/img")

Curves = dict[str, list[tuple[float, float]]]

_KINDS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("l1", {}),
    ("l2", {"clip": 2.0}),
    ("elastic_net", {"l1_ratio": 0.3}),
    ("entropy", {"mode": "bonus"}),
    ("output_magnitude", {"target": 0.5}),
)


def _pipeline(k: int) -> pw.Pipeline:
    """``k`` element-wise built-ins, cycled, with distinct names."""
    fns = pw.pipelines.builtin_penalties()
    pipe = pw.Pipeline(name=f"scaling{k}")
    for i in range(k):
        kind, options = _KINDS[i % len(_KINDS)]
        pipe = pipe.add(f"{kind}_{i}", fns[kind], weight=1e-3 * (i + 1), **options)
    return pipe


def _pipeline_costs(pipe: pw.Pipeline, x: jax.Array, repeats: int) -> dict[str, float]:
    """Median seconds of the four jitted calls on ``x``."""
    total = jax.jit(lambda p, x: p.compute_total(x))
    compute = jax.jit(lambda p, x: p.compute(x))
    tracked = jax.jit(lambda p, x: p.compute(x, track_grad_norms=True))
    plain = jax.jit(jax.value_and_grad(lambda x, p: p.compute_total(x)))
    return time_interleaved(
        {
            "compute_total": lambda: total(pipe, x),
            "compute (all metrics)": lambda: compute(pipe, x),
            "compute + grad norms": lambda: tracked(pipe, x),
            "value_and_grad(total)": lambda: plain(x, pipe),
        },
        repeats=repeats,
        warmup=2,
    )


def sweep_penalties() -> Curves:
    x = jax.nn.log_softmax(jax.random.normal(jax.random.key(1), (256, 64), jnp.float32))
    curves: Curves = {}
    for k in PENALTIES:
        for name, seconds in _pipeline_costs(_pipeline(k), x, REPEATS).items():
            curves.setdefault(name, []).append((k, 1e3 * seconds))
        print(f"  penalties={k}: " + _last(curves, "ms"), flush=True)
    return curves


def sweep_input_size() -> Curves:
    pipe = _pipeline(5)
    curves: Curves = {}
    for n in SIZES:
        logits = jax.random.normal(jax.random.key(2), (n // 256, 256), jnp.float32)
        x = jax.nn.log_softmax(logits)
        repeats = max(3, min(REPEATS, int(REPEATS * 2**18 / n)))
        for name, seconds in _pipeline_costs(pipe, x, repeats).items():
            curves.setdefault(name, []).append((n, 1e3 * seconds))
        print(f"  elements={n}: " + _last(curves, "ms"), flush=True)
    return curves


def _metrics(n: int) -> pw.Metrics:
    """A packed record of ``n`` metrics: ``(n - 1) // 4`` penalties' four keys + total."""
    names = [f"p{i}" for i in range((n - 1) // 4)]
    values: dict[str, Any] = {}
    for i, name in enumerate(names):
        values[name] = jnp.float32(i + 1)
        values[f"{name}_weighted"] = jnp.float32(0.1 * (i + 1))
        values[f"{name}_weight"] = jnp.float32(0.1)
        values[f"{name}_finite"] = jnp.bool_(True)
    values["total"] = jnp.float32(1.0)
    return jax.jit(lambda v: pw.Metrics.pack(v, penalties=names))(values)


def sweep_metrics(tmp: str) -> Curves:
    curves: Curves = {}
    for n in METRICS:
        metrics = _metrics(n)
        run = f"metrics{n}"
        sinks = [pw.sinks.Prometheus(port=None), pw.sinks.SQLite(f"{tmp}/{run}.db")]
        monitor = pw.Monitor(run, sinks=sinks, alerts=[], max_queue=RECORDS + 16)
        monitor.record(0, metrics)  # first record: layout, sink opening
        latencies = []
        cpu = time.process_time()
        for step in range(1, RECORDS + 1):
            t = time.perf_counter_ns()
            monitor.record(step, metrics)
            latencies.append(time.perf_counter_ns() - t)
        monitor.close(timeout=600)
        cpu = time.process_time() - cpu
        lost = max(monitor.stats.lost(name) for name in monitor.stats.sinks)
        curves.setdefault("record() on the training thread, median", []).append(
            (len(metrics), statistics.median(latencies) / 1e3)
        )
        curves.setdefault("process CPU per record (worker + training thread)", []).append(
            (len(metrics), 1e6 * cpu / RECORDS)
        )
        print(f"  metrics={len(metrics)}: " + _last(curves, "us") + f" lost={lost}", flush=True)
    return curves


def sweep_run_length(tmp: str) -> Curves:
    from penwatch.dashboard.sources import SQLiteSource

    from penwatch.schema import RunInfo
    from penwatch.store import StoreWriter
    from penwatch.store._synthetic import synthetic_run

    path = pathlib.Path(tmp) / "long.db"
    writer = StoreWriter(path, batch_size=4096, flush_interval=1e9)
    writer.open_run(RunInfo("long", 0, "bench", "cpu", 1, time.time()))
    curves: Curves = {}
    written = 0
    for steps in RUN_LENGTHS:
        t = time.perf_counter()
        for r in synthetic_run("long", steps - written, start=written):
            writer.add_step(r)
        writer.flush()
        per_step = (time.perf_counter() - t) / (steps - written)
        written = steps
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        cold = time_call(lambda: SQLiteSource(path).snapshot("long", None), repeats=3, warmup=0)
        source = SQLiteSource(path)
        source.snapshot("long", None)
        live = []
        for _ in range(5):
            for r in synthetic_run("long", 100, start=written):
                writer.add_step(r)
            writer.flush()
            written += 100
            t = time.perf_counter()
            source.snapshot("long", None)
            live.append(time.perf_counter() - t)
        source.close()
        curves.setdefault("store write per step (ms)", []).append((steps, 1e3 * per_step))
        curves.setdefault("store bytes per step (KB)", []).append((steps, size / steps / 1e3))
        curves.setdefault("dashboard cold refresh (s)", []).append((steps, cold))
        curves.setdefault("dashboard live refresh, +100 steps (s)", []).append(
            (steps, statistics.median(live))
        )
        print(f"  steps={steps}: " + _last(curves, ""), flush=True)
    writer.close()
    return curves


def _last(curves: Curves, unit: str) -> str:
    return ", ".join(f"{name} {points[-1][1]:.4g}{unit}" for name, points in curves.items())


Panel = tuple[Curves, str, dict[str, float]]  # curves, y label, {bar label: y}


def _plot(name: str, panels: list[Panel], *, title: str, xlabel: str, note: str = "") -> None:
    """Log-log panels side by side, saved as ``PLOTS/scaling_<name>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), dpi=110)
    for ax, (curves, ylabel, bars) in zip(np.atleast_1d(axes), panels, strict=True):
        for label, points in curves.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
        for label, y in bars.items():
            ax.axhline(y, color="0.3", linestyle="--", linewidth=1, label=label)
        ax.set_xscale("log", base=10 if name == "run_length" else 2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    mode = "QUICK run (small sweep, shared machine: noisy)" if QUICK else "full run"
    fig.text(0.01, 0.005, f"{machine()} — {mode}{note}", fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    PLOTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOTS / f"scaling_{name}.png")
    plt.close(fig)


def run(report: Report) -> None:
    sweeps: dict[str, Curves] = {}
    print("  penalties per pipeline", flush=True)
    sweeps["penalties"] = sweep_penalties()
    print("  input size", flush=True)
    sweeps["input_size"] = sweep_input_size()
    with tempfile.TemporaryDirectory() as tmp:
        print("  metrics per record", flush=True)
        sweeps["metrics"] = sweep_metrics(tmp)
        print("  run length", flush=True)
        sweeps["run_length"] = sweep_run_length(tmp)

    _draw(sweeps)
    out = ROOT / "bench-results" / "scaling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "quick": QUICK, **sweeps}, indent=1))

    for sweep, unit in (("penalties", " ms"), ("input_size", " ms"), ("metrics", " us")):
        for name, points in sweeps[sweep].items():
            x, y = points[-1]
            report.add(f"scaling {sweep}={int(x)}: {name}", y, unit=unit)
    rl = sweeps["run_length"]
    for name, points in rl.items():
        report.add(f"scaling run length={points[-1][0]:.0e}: {name}", points[-1][1], unit="")
    if RUN_LENGTHS[-1] >= 1_000_000:
        cold = rl["dashboard cold refresh (s)"][-1][1]
        live = rl["dashboard live refresh, +100 steps (s)"][-1][1]
        report.add(
            "dashboard cold refresh, 10^6 steps", cold, unit="s", bar="<= 2 s", passed=cold <= 2
        )
        report.add(
            "dashboard live refresh, 10^6 steps", live, unit="s", bar="<= 0.2 s", passed=live <= 0.2
        )


def _draw(sweeps: dict[str, Curves]) -> None:
    ms = "median time (ms)"
    pen, size, met, rl = (sweeps[k] for k in ("penalties", "input_size", "metrics", "run_length"))
    per_penalty = {k: [(x, y / x) for x, y in v] for k, v in pen.items()}
    _plot(
        "penalties",
        [(pen, ms, {}), (per_penalty, "ms per penalty", {})],
        title="Cost vs penalties per pipeline ([256,64] input, jitted, XLA)",
        xlabel="element-wise penalties in the pipeline",
    )
    per_element = {k: [(x, 1e6 * y / x) for x, y in v] for k, v in size.items()}
    _plot(
        "input_size",
        [(size, ms, {}), (per_element, "ns per element", {})],
        title="Cost vs input size (5 element-wise penalties, jitted, XLA)",
        xlabel="input elements ([n/256, 256] log-probs)",
    )
    _plot(
        "metrics",
        [(met, "µs per record", {})],
        title="Monitor cost vs metrics per record (Prometheus + SQLite)",
        xlabel="metrics per record",
    )
    store = {k: v for k, v in rl.items() if k.startswith("store")}
    refresh = {k: v for k, v in rl.items() if k.startswith("dashboard")}
    bars = {"bar: cold <= 2 s at 10^6": 2.0, "bar: live <= 0.2 s at 10^6": 0.2}
    _plot(
        "run_length",
        [(store, "ms per step / KB per step", {"bar: 0.5 KB/step": 0.5}), (refresh, "s", bars)],
        title="Store and dashboard vs run length",
        xlabel="steps in the store",
        note=f" — {_metrics_per_step()} metrics per step",
    )


def _metrics_per_step() -> int:
    from penwatch.store._synthetic import synthetic_values

    return len(synthetic_values(0))
