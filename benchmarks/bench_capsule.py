"""NaN capsules (SPEC section 13): the cost of ``nan_capsule=DIR`` on the monitor MLP.

The step is ``bench_monitor``'s (MLP ``256 -> W -> W -> 10``, Adam, five penalties, the
per-leaf counts), at the same two durations (~10 ms and ~1.5 ms, the sizes calibrated on
the machine at hand by ``bench_monitor.calibrated_size``). Bare: built without
``nan_capsule``; capsules: the same builder with a
:class:`penwatch.forensics.CapsuleWriter` watching every step (no step is non-finite, so
nothing is written: what is measured is the per-step watching). Runs of 200 steps
alternate (A/B/A/B...) and the median of the per-pair ratios must be <= 1.05. The
compiled programs are the same (``tests/test_forensics.py`` compares their HLO text).

Memory: the writer holds the inputs of the steps whose metrics it has not read yet
(``max_held`` of them at most). Most of those are inputs of steps still queued on the
device, which JAX holds anyway; what the writer adds is the inputs of steps that have
finished but are not read yet. An untimed pass samples the device's bytes in use
(``memory_stats``; on XLA:CPU, which has none, the bytes of every live ``jax.Array``: an
upper bound, since it also counts inputs that queued steps hold anyway) after each step
call, with and without the writer, and reports the difference of the peaks in input
sets (params, Adam state, batch). ``PENWATCH_BENCH_QUICK=1`` runs a
tiny size as a smoke check.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np

import penwatch as pw
from benchmarks._harness import Report
from benchmarks.bench_monitor import TARGETS, _build, _params, batch_of, calibrated_size

QUICK = bool(os.environ.get("PENWATCH_BENCH_QUICK"))
STEPS, PAIRS = (20, 3) if QUICK else (200, 21)
BAR = 1.05


def _timed(step_fn: Any, state: Any, batch: Any) -> float:
    start = time.perf_counter()
    for _ in range(STEPS):
        state, _ = step_fn(state, batch)
    jax.block_until_ready(state)
    return time.perf_counter() - start


def _nbytes(tree: Any) -> int:
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))


def _peak_bytes(step_fn: Any, state: Any, batch: Any) -> int:
    """Peak device bytes in use (``memory_stats``) sampled after each step call, or where
    the backend has no stats (XLA:CPU), the peak bytes of live ``jax.Array`` objects."""
    device = jax.devices()[0]
    jax.block_until_ready(state)
    peak = 0
    for _ in range(STEPS):
        state, _ = step_fn(state, batch)
        stats = device.memory_stats()
        if stats is not None:
            peak = max(peak, int(stats["bytes_in_use"]))
        else:
            peak = max(peak, sum(a.nbytes for a in jax.live_arrays()))
    jax.block_until_ready(state)
    return peak


def _sizes() -> dict[str, tuple[int, int]]:
    """Step label -> (width, batch): a tiny one in quick mode, else calibrated."""
    if QUICK:
        return {"tiny": (32, 16)}
    return {label: calibrated_size(label) for label in TARGETS}


def run(report: Report) -> None:
    for label, (width, batch_size) in _sizes().items():
        batch = batch_of(batch_size)
        params = _params(jax.random.PRNGKey(0), width)
        init_bare, bare = _build()
        with tempfile.TemporaryDirectory() as tmp:
            writer = pw.forensics.CapsuleWriter(tmp)
            init_cap, capsuled = _build(nan_capsule=writer)
            s_bare, s_cap = init_bare(params), init_cap(params)
            _timed(bare, s_bare, batch), _timed(capsuled, s_cap, batch)  # compile, warm up
            ratios, bare_times = [], []
            for _ in range(PAIRS):
                b = _timed(bare, s_bare, batch)
                c = _timed(capsuled, s_cap, batch)
                ratios.append(c / b)
                bare_times.append(b)
            extra = _peak_bytes(capsuled, s_cap, batch) - _peak_bytes(bare, s_bare, batch)
            writer.close()
            assert not writer.written and writer.errors == 0, writer
        step_ms = statistics.median(bare_times) / STEPS * 1e3
        ratio = statistics.median(ratios)
        print(f"  bare step ({label}): {step_ms:.2f} ms; ratios {[round(r, 3) for r in ratios]}")
        report.add(
            f"nan_capsule step time / bare, {step_ms:.1f} ms step ({STEPS} steps)",
            ratio,
            bar=f"<= {BAR}x",
            passed=ratio <= BAR,
        )
        one_set = _nbytes((s_cap, batch))
        report.add(
            f"nan_capsule memory: input sets referenced (max_held, depth {writer.depth}), "
            f"{step_ms:.1f} ms step",
            writer.max_held,
            unit=" sets",
        )
        what = "device bytes" if jax.devices()[0].memory_stats() else "live-array bytes"
        report.add(
            f"nan_capsule memory: extra peak {what} / one input set "
            f"({one_set / 2**20:.2f} MiB), {step_ms:.1f} ms step",
            extra / one_set,
            unit=" sets",
        )
