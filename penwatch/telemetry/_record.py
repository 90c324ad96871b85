"""What the monitor hands to sinks: host-side, plain-Python views of one step.

The monitor's worker turns the device arrays a training step returned into a
:class:`StepRecord` (Python floats, keys parsed into penalties and gradient terms) and
hands it to every sink. Sinks never see device arrays and never parse keys themselves.

Metric keys follow SPEC sections 3 and 4:

* per penalty ``P``: ``P`` (raw value), ``P_weighted``, ``P_weight``, ``P_finite`` and,
  with input-gradient tracking, ``P_grad_norm``;
* per gradient term ``T`` (``base`` or a penalty name): ``T_param_grad_norm``,
  ``T_grad_share``, ``T_grad_cosine``;
* run level: ``total``, ``total_grad_norm``, ``loss``, ``base_loss``.

A penalty is recognised by its ``P_weight`` key (every computed penalty has one), a
gradient term by its ``T_grad_share`` key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

PENALTY_QUANTITIES: Mapping[str, str] = {
    "value": "",
    "weighted": "_weighted",
    "weight": "_weight",
    "grad_norm": "_grad_norm",
    "finite": "_finite",
}
"""Quantity name -> key suffix for per-penalty metrics (SPEC section 3)."""

TERM_QUANTITIES: Mapping[str, str] = {
    "param_grad_norm": "_param_grad_norm",
    "grad_share": "_grad_share",
    "grad_cosine": "_grad_cosine",
}
"""Quantity name -> key suffix for per-term gradient diagnostics (SPEC section 4)."""

RUN_KEYS: tuple[str, ...] = ("total", "total_grad_norm", "loss", "base_loss")

EventKind = Literal["nonfinite", "alert", "info"]
Severity = Literal["info", "warning", "critical"]


def parse_penalties(keys: Mapping[str, Any] | set[str]) -> tuple[str, ...]:
    """Penalty names present in a flat metrics dict, in key order."""
    return tuple(k[: -len("_weight")] for k in keys if k.endswith("_weight") and k != "_weight")


def parse_terms(keys: Mapping[str, Any] | set[str]) -> tuple[str, ...]:
    """Gradient-diagnostic term names (``base`` first when present), in key order."""
    terms = [k[: -len("_grad_share")] for k in keys if k.endswith("_grad_share")]
    return tuple(sorted(terms, key=lambda t: t != "base"))


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """One non-finite metric: which key, NaN or Inf, and where it came from."""

    key: str
    kind: Literal["nan", "inf"]
    source: Literal["loss", "penalty", "gradient", "total", "other"]
    penalty: str | None = None


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """A parameter or gradient leaf holding non-finite values (from in-step masks)."""

    tree: Literal["params", "grads"]
    path: str
    nan_count: int
    inf_count: int


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One recorded step, materialized on the host.

    Attributes:
      run: run name (a Prometheus label and the store's run key).
      process: ``jax.process_index()`` of the recording process.
      step: training step.
      pipeline: pipeline label of the penalties in this record.
      wall_time: Unix time at which ``Monitor.record`` was called.
      values: every scalar metric as a Python float (NaN/Inf kept as floats).
      penalties: penalty names parsed from ``values``.
      terms: gradient-diagnostic terms parsed from ``values``.
      loss: the base (task) loss when given.
      duration_seconds: dispatch-to-ready time of the step's results, or None.
      nonfinite: non-finite metrics, first offender first.
      leaves: non-finite parameter/gradient leaves, largest counts first.
      trace_id: the OpenTelemetry trace id of this step's span, when tracing is on.
      kind: ``"train_step"`` (a train step's metrics) or ``"pipeline_compute"`` (a
        pipeline's); selects the span name ``penwatch.train_step`` or
        ``penwatch.pipeline.compute``.
      dispatched_at_ns: Unix ns just before the step was dispatched (or when ``record``
        was called, when the caller did not say).
      ready_at_ns: Unix ns at which the worker saw the step's results ready.
      dropped: cumulative records lost so far by reason (``queue_full``, ``sink_error``,
        ...), a snapshot taken when this record was built.
    """

    run: str
    process: int
    step: int
    pipeline: str
    wall_time: float
    values: Mapping[str, float]
    penalties: tuple[str, ...] = ()
    terms: tuple[str, ...] = ()
    loss: float | None = None
    duration_seconds: float | None = None
    nonfinite: tuple[NonFinite, ...] = ()
    leaves: tuple[LeafReport, ...] = ()
    trace_id: int | None = None
    kind: Literal["train_step", "pipeline_compute"] = "pipeline_compute"
    dispatched_at_ns: int | None = None
    ready_at_ns: int | None = None
    dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def penalty(self, name: str) -> dict[str, float]:
        """Quantities recorded for one penalty, keyed by :data:`PENALTY_QUANTITIES`."""
        out = {}
        for quantity, suffix in PENALTY_QUANTITIES.items():
            key = name + suffix
            if key in self.values:
                out[quantity] = self.values[key]
        return out

    def term(self, name: str) -> dict[str, float]:
        """Gradient diagnostics recorded for one term, keyed by :data:`TERM_QUANTITIES`."""
        out = {}
        for quantity, suffix in TERM_QUANTITIES.items():
            key = name + suffix
            if key in self.values:
                out[quantity] = self.values[key]
        return out

    @property
    def ok(self) -> bool:
        """True when every metric is finite."""
        return not self.nonfinite

    @property
    def first_offender(self) -> NonFinite | None:
        """The first non-finite metric in computation order, or None when all are finite."""
        return self.nonfinite[0] if self.nonfinite else None


@dataclasses.dataclass(frozen=True)
class Event:
    """Something that happened at a step: a non-finite detection, an alert, a note."""

    run: str
    process: int
    step: int
    wall_time: float
    kind: EventKind
    name: str
    message: str
    severity: Severity = "warning"
    attributes: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """Identity of a run, given to every sink once when the monitor starts."""

    run: str
    process: int
    version: str
    backend: str
    devices: int
    started_at: float
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def is_finite(value: float) -> bool:
    """``math.isfinite`` that accepts bools and ints."""
    return math.isfinite(float(value))
