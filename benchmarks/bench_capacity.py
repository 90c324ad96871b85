"""Monitor capacity (SPEC section 9): records per second with no drops, training kept.

The step is trivial (a jitted function of a scalar returning a ``pw.Metrics`` of 20 or
200 metrics, ~20 us), paced by the loop to a target rate: every ``1/rate`` seconds one
step is dispatched and recorded. Bare, the same paced loop runs without a monitor. For
each target the benchmark reports the rate the instrumented loop achieved over its bare
rate (bar >= 0.9) and checks that nothing was dropped, with Prometheus + SQLite (and
OpenTelemetry spans for the second row). It also reports ``record()``'s median and p99
on the training thread (bars 20 us and 200 us).

The bars: >= 10,000 records/s at 20 metrics, >= 5,000/s with spans on too, >= 2,000/s at
200 metrics.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import penwatch as pw
from benchmarks._harness import Report

SECONDS = 3.0
CASES = (  # (metrics per record, target records/s, OpenTelemetry on)
    (20, 10_000, False),
    (20, 5_000, True),
    (200, 2_000, False),
)


def _step(metrics: int) -> Any:
    names = [f"p{i}" for i in range(metrics // 4)]

    @jax.jit
    def step(x: jax.Array) -> tuple[jax.Array, pw.Metrics]:
        values: dict[str, jax.Array] = {}
        for i, name in enumerate(names):
            v = x * (i + 1)
            values[name] = v
            values[f"{name}_weighted"] = 0.1 * v
            values[f"{name}_weight"] = jnp.float32(0.1)
            values[f"{name}_finite"] = jnp.isfinite(v)
        values["total"] = x
        return x + 1, pw.Metrics.pack(values, penalties=names)

    return step


def _loop(step: Any, rate: float, n: int, monitor: pw.Monitor | None) -> tuple[float, list[int]]:
    x = jnp.float32(0)
    period = 1.0 / rate
    latencies: list[int] = []
    start = time.perf_counter()
    for i in range(n):
        due = start + i * period
        while time.perf_counter() < due:  # pace: one step per period
            pass
        x, metrics = step(x)
        if monitor is not None:
            t = time.perf_counter_ns()
            monitor.record(i, metrics)
            latencies.append(time.perf_counter_ns() - t)
    jax.block_until_ready(x)
    return n / (time.perf_counter() - start), latencies


def _sinks(tmp: str, run: str, otel: bool) -> tuple[list[pw.sinks.Sink], Any]:
    sinks: list[pw.sinks.Sink] = [
        pw.sinks.Prometheus(port=None),
        pw.sinks.SQLite(f"{tmp}/{run}.db"),
    ]
    provider = None
    if otel:
        provider = TracerProvider()
        provider.add_span_processor(
            BatchSpanProcessor(InMemorySpanExporter(), max_queue_size=1 << 17)
        )
        sinks.append(pw.sinks.OpenTelemetry(provider))
    return sinks, provider


def run(report: Report) -> None:
    all_latencies: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        for metrics, rate, otel in CASES:
            step = _step(metrics)
            jax.block_until_ready(step(jnp.float32(0)))
            n = int(rate * SECONDS)
            bare, _ = _loop(step, rate, n, None)
            run_name = f"cap{metrics}{'otel' if otel else ''}"
            sinks, provider = _sinks(tmp, run_name, otel)
            monitor = pw.Monitor(run_name, sinks=sinks, alerts=[], close_timeout=120)
            inst, latencies = _loop(step, rate, n, monitor)
            monitor.close()
            if provider is not None:
                provider.shutdown()
            stats = monitor.stats
            lost = max(stats.lost(name) for name in stats.sinks)
            all_latencies += latencies
            what = f"{metrics} metrics, Prometheus+SQLite{'+OTel' if otel else ''}"
            print(f"  {what}: bare {bare:.0f}/s, instrumented {inst:.0f}/s, lost {lost}")
            report.add(
                f"monitor capacity at {rate:,}/s, {what}: loop rate / bare (lost {lost})",
                inst / bare,
                bar=">= 0.9x, none lost",
                passed=inst / bare >= 0.9 and lost == 0,
            )
    median = statistics.median(all_latencies) / 1e3
    p99 = float(np.percentile(all_latencies, 99)) / 1e3
    report.add("record() on the training thread, median", median, unit="us", bar="<= 20 us",
               passed=median <= 20)  # fmt: skip
    report.add("record() on the training thread, p99", p99, unit="us", bar="<= 200 us",
               passed=p99 <= 200)  # fmt: skip
