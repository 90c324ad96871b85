"""Shared timing helpers and the report every benchmark writes its ratios to.

Timings always end with ``jax.block_until_ready`` (see JAX's async-dispatch docs), are
repeated, and are summarized by their median.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

QUICK_ENV = "PENWATCH_BENCH_QUICK"
"""Set to 1 for a quick run (``PENWATCH_BENCH_QUICK=1 make bench``): fewer repeats and
smaller scaling sweeps, for checking that the benchmarks run; not for the docs' figures."""


def quick() -> bool:
    """True in quick mode (:data:`QUICK_ENV` set to anything but ``""``/``0``)."""
    return os.environ.get(QUICK_ENV, "") not in ("", "0")


def machine() -> str:
    """The machine in one line: architecture, CPUs available, JAX backend and device."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={cpus} "
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"jax={jax.__version__}"
    )


def time_call(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in seconds of ``fn()`` with its outputs made ready."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], *, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median wall time in seconds of each ``fn()``, measured in interleaved rounds.

    Each round times every function once, in turn, so that a slow period of a shared
    machine (other processes, frequency changes) hits all of them alike and their
    ratios stay meaningful. The order rotates from round to round, so that no function
    always runs right after the same other one (e.g. after an eager, host-syncing
    pattern that leaves the thread pool asleep and the caches cold).
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            jax.block_until_ready(fns[name]())
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclasses.dataclass
class Row:
    name: str
    value: float
    unit: str
    bar: str = ""
    passed: bool | None = None


@dataclasses.dataclass
class Report:
    """Rows printed as one table at the end of ``make bench``."""

    rows: list[Row] = dataclasses.field(default_factory=list)

    def add(
        self, name: str, value: float, *, unit: str = "x", bar: str = "", passed: bool | None = None
    ) -> None:
        self.rows.append(Row(name, value, unit, bar, passed))
        verdict = "" if passed is None else ("  PASS" if passed else "  FAIL")
        print(f"  {name}: {_fmt(value)}{unit}  {bar}{verdict}", flush=True)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.passed is False]

    def markdown(self) -> str:
        lines = ["| measurement | median | bar | verdict |", "|---|---|---|---|"]
        for r in self.rows:
            verdict = "" if r.passed is None else ("pass" if r.passed else "FAIL")
            lines.append(f"| {r.name} | {_fmt(r.value)}{r.unit} | {r.bar} | {verdict} |")
        return "\n".join(lines)


def _fmt(value: float) -> str:
    """Counts print as integers, everything else with three decimals."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.3f}"
