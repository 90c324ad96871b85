"""``Prometheus``: the SPEC section 6 metrics, served over HTTP or pushed to a gateway.

Metrics live in a :class:`prometheus_client.CollectorRegistry` of the sink's own (never
the process-global one, so two monitors or a re-created sink never collide) and are
served by ``prometheus_client.start_http_server`` on ``addr:port`` (127.0.0.1 by
default). Scrapes asking for OpenMetrics see the trace-id exemplars of the duration
histogram.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from penwatch import _checks
from penwatch.schema import Event, Layout, RunInfo, RunStatus, StepRecord, term_key
from penwatch.sinks._base import Sink

__all__ = ["DURATION_BUCKETS", "METRICS", "Prometheus"]

logger = logging.getLogger("penwatch.sinks")
_FN = "penwatch.sinks.Prometheus"

_RUN = ("run", "process")
_PEN = (*_RUN, "pipeline", "penalty")

METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "penwatch_step": ("gauge", _RUN, "Last recorded step."),
    "penwatch_last_step_timestamp_seconds": (
        "gauge",
        _RUN,
        "Unix time of the last recorded step.",
    ),
    "penwatch_loss": ("gauge", _RUN, "Base (task) loss at the last recorded step."),
    "penwatch_penalty_value": ("gauge", _PEN, "Raw penalty value."),
    "penwatch_penalty_weighted_value": ("gauge", _PEN, "Weight times penalty value."),
    "penwatch_penalty_weight": ("gauge", _PEN, "Current penalty weight."),
    "penwatch_pipeline_value": ("gauge", (*_RUN, "pipeline"), "Sum of weighted penalties."),
    "penwatch_penalty_grad_norm": (
        "gauge",
        (*_PEN, "wrt"),
        "Gradient norm: wrt=input (raw penalty, pipeline input) or params (weighted term).",
    ),
    "penwatch_penalty_grad_share": (
        "gauge",
        _PEN,
        "Additive contribution <g_i, g> / |g|^2 of a term to the parameter update.",
    ),
    "penwatch_penalty_grad_cosine": (
        "gauge",
        _PEN,
        "Cosine between a term's parameter gradient and the base-loss gradient.",
    ),
    "penwatch_penalty_update_share": (
        "gauge",
        _PEN,
        "Share <P g_i, P g> / |P g|^2 of a term in the optimizer's (diagonally "
        "preconditioned) update.",
    ),
    "penwatch_penalty_suggested_weight": (
        "gauge",
        _PEN,
        "Advisory weight that brings the term's gradient share and pull into the band.",
    ),
    "penwatch_penalty_pair_cosine": (
        "gauge",
        (*_PEN, "other"),
        "Cosine between two terms' parameter gradients (from the term Gram matrix).",
    ),
    "penwatch_penalty_group_grad_norm": (
        "gauge",
        (*_PEN, "group"),
        "A term's parameter-gradient norm over one top-level parameter group (layer).",
    ),
    "penwatch_capture_dead_fraction": (
        "gauge",
        (*_RUN, "pipeline", "capture"),
        "Fraction of a captured activation's units that are zero for the whole batch.",
    ),
    "penwatch_nonfinite_total": (
        "counter",
        (*_RUN, "kind", "source"),
        "Non-finite detections by kind (nan/inf) and metric key.",
    ),
    "penwatch_nonfinite_steps_total": (
        "counter",
        _RUN,
        "Steps (records) holding any non-finite metric or leaf.",
    ),
    "penwatch_nonfinite_episodes_total": (
        "counter",
        _RUN,
        "Non-finite episodes: runs of consecutive non-finite steps (one NonFinite alert each).",
    ),
    "penwatch_nonfinite_first_step": (
        "gauge",
        (*_RUN, "pipeline", "kind", "source", "leaf"),
        "First step of the latest non-finite episode; labels name its first offender "
        "(source: the first non-finite metric key, leaf: the first non-finite leaf; "
        "'none' when there is none).",
    ),
    "penwatch_pipeline_compute_duration_seconds": (
        "histogram",
        (*_RUN, "pipeline"),
        "Pipeline compute / train step time from dispatch until its results are ready.",
    ),
    "penwatch_alerts_total": ("counter", (*_RUN, "alert"), "Fired alerts."),
    "penwatch_telemetry_dropped_total": ("counter", (*_RUN, "reason"), "Records dropped."),
    "penwatch_run_info": (
        "gauge",
        (*_RUN, "version", "backend", "devices"),
        "Always 1; labels identify the run.",
    ),
}
"""SPEC section 6 metric name -> (type, label names, help)."""

DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Histogram buckets (seconds) of ``penwatch_pipeline_compute_duration_seconds``."""

_DROP_REASONS = (
    "queue_full",
    "materialize_error",
    "invalid",
    "close_timeout",
    "sink_overflow",
    "sink_poison",
    "sink_unfinished",
)
_LATEST_GAUGES = (
    "penwatch_step",
    "penwatch_last_step_timestamp_seconds",
    "penwatch_loss",
    "penwatch_penalty_value",
    "penwatch_penalty_weighted_value",
    "penwatch_penalty_weight",
    "penwatch_pipeline_value",
    "penwatch_penalty_grad_norm",
    "penwatch_penalty_grad_share",
    "penwatch_penalty_grad_cosine",
    "penwatch_penalty_update_share",
    "penwatch_penalty_suggested_weight",
    "penwatch_penalty_pair_cosine",
    "penwatch_penalty_group_grad_norm",
    "penwatch_capture_dead_fraction",
)
_PENALTY_GAUGES = {
    "value": "penwatch_penalty_value",
    "weighted": "penwatch_penalty_weighted_value",
    "weight": "penwatch_penalty_weight",
}
_TERM_GAUGES = {
    "grad_share": "penwatch_penalty_grad_share",
    "grad_cosine": "penwatch_penalty_grad_cosine",
    "update_share": "penwatch_penalty_update_share",
    "suggested_weight": "penwatch_penalty_suggested_weight",
}
_PAIR = "\x00pair_cosine"
"""Values key prefix of the pair cosines the sink derives from the Gram matrix."""


class Prometheus(Sink):
    """Exposes the SPEC section 6 metrics (names, types, labels) for Prometheus.

    Every metric carries ``run`` and ``process``; penalty metrics also ``pipeline`` and
    ``penalty`` (gradient-diagnostic figures use the term name, ``base`` for the task
    loss). If the port is taken, ``open`` raises: the monitor logs and counts it, retries
    with backoff, and the other sinks keep writing.

    Args:
      port: port of the ``/metrics`` endpoint; 0 picks a free one (see :attr:`port`);
        None serves nothing (registry or pushgateway only).
      addr: address to bind (loopback by default; ``"0.0.0.0"`` to expose it).
      registry: registry to register the metrics in; None creates a fresh one.
      pushgateway: Pushgateway URL for batch jobs: pushed on flush (at most every
        ``push_interval`` seconds) and on close, job ``job``, grouped by run and process.
      job: Pushgateway job name.
      push_interval: minimum seconds between pushes on flush.
      buckets: histogram buckets in seconds.
    """

    name = "Prometheus"

    def __init__(
        self,
        port: int | None = 9464,
        addr: str = "127.0.0.1",
        registry: CollectorRegistry | None = None,
        *,
        pushgateway: str | None = None,
        job: str = "penwatch",
        push_interval: float = 10.0,
        buckets: Sequence[float] = DURATION_BUCKETS,
    ) -> None:
        if port is not None:
            port = _checks.check_int(_FN, "port", port, min=0, max=65535)
        if not isinstance(addr, str) or not addr:
            raise _checks.option_error(_FN, "addr", addr, "a host address such as '127.0.0.1'")
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise _checks.option_error(_FN, "registry", registry, "None or a CollectorRegistry")
        if pushgateway is not None and not isinstance(pushgateway, str):
            raise _checks.option_error(_FN, "pushgateway", pushgateway, "None or a URL string")
        self._requested_port, self.addr = port, addr
        self.registry = CollectorRegistry() if registry is None else registry
        self.pushgateway, self.job = pushgateway, job
        self.push_interval = _checks.check_nonnegative(_FN, "push_interval", push_interval)
        self.buckets = tuple(buckets)
        self._metrics: dict[str, Any] | None = None
        self._children: dict[tuple[Any, ...], Any] = {}
        self._latest = _Latest()
        self._server: Any = None
        self._info: RunInfo | None = None
        self._base: tuple[str, str] = ("", "0")
        self._dropped_seen: dict[str, int] = {}
        self._first_step_labels: tuple[str, ...] | None = None
        self._last_push = -float("inf")

    @property
    def port(self) -> int | None:
        """The bound port while serving (useful with ``port=0``), else the requested one."""
        return self._server.server_port if self._server is not None else self._requested_port

    @property
    def url(self) -> str | None:
        """``http://addr:port/metrics`` while serving, else None."""
        if self._server is None:
            return None
        return f"http://{self.addr}:{self.port}/metrics"

    def open(self, info: RunInfo) -> None:
        if self._metrics is None:
            self._info, self._base = info, (info.run, str(info.process))
            self._latest.base = self._base
            self._metrics = self._create()
            self._metrics["penwatch_run_info"].labels(
                *self._base, info.version, info.backend, str(info.devices)
            ).set(1)
            for reason in _DROP_REASONS:
                self._child("penwatch_telemetry_dropped_total", *self._base, reason)
            for name in ("penwatch_nonfinite_steps_total", "penwatch_nonfinite_episodes_total"):
                self._child(name, *self._base)  # at 0, so the first increase shows
            for alert in info.config.get("alerts", ()):
                self._child("penwatch_alerts_total", *self._base, str(alert))
        if self._requested_port is not None and self._server is None:
            try:
                self._server, _ = prometheus_client.start_http_server(
                    self._requested_port, addr=self.addr, registry=self.registry
                )
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"{_FN}: cannot serve /metrics on {self.addr}:{self._requested_port}: "
                    f"{exc.strerror or exc}",
                ) from exc

    def _create(self) -> dict[str, Any]:
        types = {"gauge": Gauge, "counter": Counter}
        out = {}
        self.registry.register(self._latest)
        for name, (kind, labels, doc) in METRICS.items():
            if name in _LATEST_GAUGES:
                continue  # served at scrape time from the latest values (_Latest)
            if kind == "histogram":
                out[name] = Histogram(
                    name, doc, labels, registry=self.registry, buckets=self.buckets
                )
            else:  # prometheus_client appends _total to counters itself
                short = name.removesuffix("_total") if kind == "counter" else name
                out[name] = types[kind](short, doc, labels, registry=self.registry)
        return out

    def _child(self, name: str, *labels: str) -> Any:
        key = (name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._metrics[name].labels(*labels)  # type: ignore[index]
        return child

    def write_step(self, record: StepRecord) -> None:
        self.write_steps((record,))

    def write_steps(self, records: Sequence[StepRecord]) -> None:
        """Count and time every record; the gauges take each layout's newest values."""
        if self._metrics is None:
            raise RuntimeError(f"{_FN}: write_step before open")
        if not records:
            return
        base, child = self._base, self._child
        self._latest.update_many(records)
        for record in records:
            for nf in record.nonfinite:
                child("penwatch_nonfinite_total", *base, nf.kind, nf.key).inc()
            if record.has_nonfinite:
                child("penwatch_nonfinite_steps_total", *base).inc()
            if record.duration_seconds is not None:
                exemplar = None
                if record.trace_id:
                    exemplar = {"trace_id": format(record.trace_id, "032x")}
                child("penwatch_pipeline_compute_duration_seconds", *base, record.pipeline).observe(
                    max(record.duration_seconds, 0.0), exemplar=exemplar
                )
        for reason, count in records[-1].dropped.items():  # cumulative: the newest says all
            delta = count - self._dropped_seen.get(reason, 0)
            if delta > 0:
                child("penwatch_telemetry_dropped_total", *base, reason).inc(delta)
                self._dropped_seen[reason] = count

    def write_event(self, event: Event) -> None:
        if self._metrics is None or event.kind not in ("alert", "nonfinite"):
            return
        alert = str(event.attributes.get("alert", event.name))
        self._child("penwatch_alerts_total", *self._base, alert).inc()
        if event.kind == "nonfinite":
            self._new_episode(event)

    def _new_episode(self, event: Event) -> None:
        """One series per run and process names the latest episode's first offender."""
        a = event.attributes
        leaves = a.get("leaves") or ()
        # "none", not "": Prometheus drops empty labels, and the alert text shows them
        leaf = f"{leaves[0]['tree']}{leaves[0]['path']}" if leaves else "none"
        kind = a.get("kind")
        if kind is None and leaves:
            kind = "inf" if leaves[0]["inf"] else "nan"
        labels = (*self._base, str(a.get("pipeline", "")), str(kind or "none"),
                  str(a.get("metric") or "none"), leaf)  # fmt: skip
        gauge = self._metrics["penwatch_nonfinite_first_step"]  # type: ignore[index]
        if self._first_step_labels is not None:
            gauge.remove(*self._first_step_labels)
        gauge.labels(*labels).set(event.step)
        self._first_step_labels = labels
        self._child("penwatch_nonfinite_episodes_total", *self._base).inc()

    def flush(self) -> None:
        if self.pushgateway and time.monotonic() - self._last_push >= self.push_interval:
            self._push()

    def _push(self) -> None:
        self._last_push = time.monotonic()
        prometheus_client.push_to_gateway(
            self.pushgateway,
            job=self.job,
            registry=self.registry,
            grouping_key={"run": self._base[0], "process": self._base[1]},
            timeout=5.0,
        )

    def close(self, *, status: RunStatus = "finished") -> None:
        try:
            if self.pushgateway and self._metrics is not None:
                self._push()
        finally:
            if self._server is not None:
                # serve_forever notices shutdown() only at its next 0.5 s poll: stop it in
                # the background so close() (and the monitor's) returns at once.
                server, self._server = self._server, None
                threading.Thread(
                    target=_stop_server, args=(server,), name="penwatch-metrics-stop", daemon=True
                ).start()


def _stop_server(server: Any) -> None:
    server.shutdown()
    server.server_close()


class _Latest:
    """The gauges of SPEC section 6, served at scrape time from the latest values.

    Writing a record only merges its values into one dict per pipeline (a C-level
    ``dict.update``) instead of setting one gauge child per metric; a scrape turns them
    into metric families. A value keeps its last reading until a record carries it
    again, as a gauge would (diagnostics keys appear only every few steps).
    """

    def __init__(self) -> None:
        self.base: tuple[str, str] = ("", "0")
        self._lock = threading.Lock()
        self._run: dict[str, float] = {}
        self._values: dict[str, dict[str, float]] = {}
        # per pipeline: (metric name, extra labels, key) of every gauge seen, per layout
        self._plans: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {}
        self._seen: dict[str, set[Layout]] = {}

    def update_many(self, records: Sequence[StepRecord]) -> None:
        """Merge records' values in order. Records of one pipeline and layout carry the
        same keys, so only the newest of each is merged (in the order of those newest):
        the same dicts as merging every record, at the cost of one per layout."""
        newest: dict[tuple[str, Layout], StepRecord] = {}
        for record in records:
            key = (record.pipeline, record.layout)
            newest.pop(key, None)  # re-inserted last: keeps the order of the newest
            newest[key] = record
        with self._lock:
            last = records[-1]
            self._run["penwatch_step"] = last.step
            self._run["penwatch_last_step_timestamp_seconds"] = last.wall_time
            loss = next((r.loss for r in reversed(records) if r.loss is not None), None)
            if loss is not None:
                self._run["penwatch_loss"] = loss
            for record in newest.values():
                self._merge(record)

    def _merge(self, record: StepRecord) -> None:
        pipe = record.pipeline
        values = self._values.get(pipe)
        if values is None:
            values = self._values[pipe] = {}
            self._plans[pipe], self._seen[pipe] = {}, set()
        values.update(record.values)
        pairs = _pair_cosines(record)
        values.update(pairs)
        seen = self._seen[pipe]
        if record.layout not in seen:
            if len(seen) >= 256:  # keys that change every step: forget, merge again
                seen.clear()
            seen.add(record.layout)
            self._plans[pipe].update(_gauge_plan(record.layout))
            self._plans[pipe].update(
                (key, ("penwatch_penalty_pair_cosine", tuple(key.split("\x00")[2:])))
                for key in pairs
            )

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(name, METRICS[name][2]) for name in _LATEST_GAUGES]

    def collect(self) -> list[GaugeMetricFamily]:
        with self._lock:
            run = dict(self._run)
            values = {p: dict(v) for p, v in self._values.items()}
            plans = {p: dict(v) for p, v in self._plans.items()}
        families = {
            name: GaugeMetricFamily(name, METRICS[name][2], labels=list(METRICS[name][1]))
            for name in _LATEST_GAUGES
        }
        for name, value in run.items():
            families[name].add_metric(self.base, value)
        for pipe, plan in plans.items():
            for key, (name, labels) in plan.items():
                if key in values[pipe]:
                    families[name].add_metric((*self.base, pipe, *labels), values[pipe][key])
        return [f for f in families.values() if f.samples]


def _gauge_plan(layout: Layout) -> dict[str, tuple[str, tuple[str, ...]]]:
    """metric key -> (gauge name, labels after run/process/pipeline) for a layout."""
    plan: dict[str, tuple[str, tuple[str, ...]]] = {}
    for slot in layout.slots:
        name = str(slot.name)
        if slot.scope == "penalty" and slot.quantity in _PENALTY_GAUGES:
            plan[slot.key] = (_PENALTY_GAUGES[slot.quantity], (name,))
        elif slot.scope == "penalty" and slot.quantity == "grad_norm":
            plan[slot.key] = ("penwatch_penalty_grad_norm", (name, "input"))
        elif slot.scope == "term" and slot.quantity == "param_grad_norm":
            plan[slot.key] = ("penwatch_penalty_grad_norm", (name, "params"))
        elif slot.scope == "term" and slot.quantity in _TERM_GAUGES:
            plan[slot.key] = (_TERM_GAUGES[slot.quantity], (name,))
        elif slot.quantity == "group_grad_norm":
            group = slot.key[len(term_key(name, "param_grad_norm")) + 1 : -1]
            plan[slot.key] = ("penwatch_penalty_group_grad_norm", (name, group))
        elif slot.quantity == "dead_fraction":
            plan[slot.key] = ("penwatch_capture_dead_fraction", (name,))
        elif slot.key == "total":
            plan[slot.key] = ("penwatch_pipeline_value", ())
    return plan


def _pair_cosines(record: StepRecord) -> dict[str, float]:
    """``cos(ĝ_a, ĝ_b)`` for every pair ``a < b`` of terms, from the record's Gram
    matrix (empty without one); 0 where a gradient is zero."""
    found = record.gram()
    if found is None:
        return {}
    terms, gram = found
    out = {}
    for i, a in enumerate(terms):
        for j in range(i + 1, len(terms)):
            denom = math.sqrt(max(gram[i][i], 0.0) * max(gram[j][j], 0.0))
            cos = gram[i][j] / denom if denom > 0 else 0.0
            out[f"{_PAIR}\x00{a}\x00{terms[j]}"] = min(max(cos, -1.0), 1.0)
    return out
