"""Shared timing helpers and the report every benchmark writes its ratios to.

Timings always end with ``jax.block_until_ready`` (see JAX's async-dispatch docs), are
repeated, and are summarized by their median.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

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


@dataclasses.dataclass(frozen=True)
class CpuTimes:
    """CPU seconds so far: the whole machine's (``/proc/stat``) and this process's
    finished children's (``getrusage``), to tell what other processes took meanwhile."""

    busy: float
    """Every process on the machine: user, nice, system, irq and softirq time."""
    steal: float
    """Time the hypervisor gave the machine's virtual CPUs to someone else."""
    children: float
    """User and system time of this process's children that have ended and been waited
    for (their own waited-for children included)."""


def cpu_times() -> CpuTimes | None:
    """The machine's and this process's children's CPU time; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    # cpu user nice system idle iowait irq softirq steal ...
    user, nice, system, _, _, irq, softirq, steal = (int(v) / tick for v in fields[1:9])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuTimes(
        busy=user + nice + system + irq + softirq,
        steal=steal,
        children=usage.ru_utime + usage.ru_stime,
    )


def contention(before: CpuTimes, after: CpuTimes, *, wall: float, cpus: int) -> tuple[float, float]:
    """``(others, steal)`` between two :func:`cpu_times`: the shares (0-1) of the
    machine's ``cpus`` over ``wall`` seconds that other processes used (everything busy
    but the children that ended meanwhile) and that the hypervisor took."""
    capacity = wall * cpus
    others = (after.busy - before.busy) - (after.children - before.children)
    return max(others, 0.0) / capacity, (after.steal - before.steal) / capacity


REFERENCE_ROUNDS = 5


def reference_seconds(rounds: int = REFERENCE_ROUNDS) -> float:
    """Median seconds of a fixed single-threaded CPU workload (a Python loop of 200,000
    additions and a NumPy sort of 100,000 floats): how fast this machine runs at the
    moment. A shared machine's CPUs slow down with their neighbours' work (SMT siblings,
    caches, memory bandwidth) without counting it as steal, so a run is best compared
    with another by this figure too."""
    values = np.random.default_rng(0).random(100_000)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        total = 0
        for i in range(200_000):
            total += i
        np.sort(values)
        samples.append(time.perf_counter() - start)
    assert total == 199_999 * 200_000 // 2
    return statistics.median(samples)


def nearest_by_ratio(values: Sequence[float], target: float) -> int:
    """The index of the value nearest ``target`` by ratio (``|log(value / target)|``)."""
    return min(range(len(values)), key=lambda i: abs(math.log(values[i] / target)))


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
