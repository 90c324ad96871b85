"""The :class:`Snapshot` every source builds, and how the SQLite source builds it.

A snapshot holds tidy DataFrames ready for the chart builders (``dashboard/charts.py``):
one row per drawn point, long format, NaN for gaps, never ±Inf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from penwatch import schema, store
from penwatch.dashboard._runs import LIVE, RunChoice, combine_statuses
from penwatch.schema import thresholds

__all__ = ["ALL_PROCESSES", "Headline", "RunChoice", "Snapshot", "build"]

ALL_PROCESSES = None
"""``process`` value meaning every process of the run, aggregated."""

DOMINANCE_THRESHOLD = thresholds.DOMINANCE_SHARE
"""A penalty whose gradient share exceeds this dominates (as ``GradientDominance``)."""

CONFLICT_COSINE = thresholds.CONFLICT_COSINE
"""A penalty whose cosine to the base-loss gradient is below this conflicts with it."""

OPEN_ALERT_STEPS = 500
"""An alert counts as open while fewer steps than this have passed since it fired, or
while its condition (dominance, conflict, non-finite) still holds."""

TERM_QUANTITIES = tuple(schema.TERM_QUANTITIES)


@dataclasses.dataclass
class Headline:
    """The numbers at the top of the page (None where unknown)."""

    step: int | None = None
    loss: float | None = None
    total: float | None = None
    penalty_share: float | None = None
    nonfinite: int = 0
    open_alerts: int = 0
    alerts: int = 0
    status: str = "unknown"
    updated_at: float | None = None

    @property
    def live(self) -> bool:
        """True while the run (some process of it) is still being written."""
        return self.status == LIVE


def _frame(*columns: str) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object if c in _TEXT else float) for c in columns})


_TEXT = {
    "penalty",
    "series",
    "term",
    "quantity",
    "kind",
    "name",
    "severity",
    "message",
    "status",
    "percentile",
    "label",
}


@dataclasses.dataclass
class Snapshot:
    """Everything the views draw for one run selection.

    Attributes:
      width: downsampling bucket width in steps (1: every step is drawn).
      contributions: ``step, penalty, value`` — weighted penalty values (stackable).
      shares: ``penalty, weighted, share`` — each penalty's share of the total, latest.
      losses: ``step, series, value`` — base loss and total penalty.
      nonfinite_steps: ``step, count`` — where non-finite values were recorded.
      grads: ``step, term, quantity, value`` — gradient norms/shares/cosines per term.
      grad_wrt: ``"params"`` (SPEC §4 terms), ``"input"`` (§3 norms) or None.
      terms: ``term, grad_norm, grad_share, grad_cosine, status`` — latest, with
        ``status`` one of ``ok``, ``dominating``, ``conflicting``.
      events: ``step, wall_time, kind, name, severity, message, process``.
      durations: ``step, percentile, ms`` — p50/p90/p99 over the recent window.
      duration_summary: ``{"p50": ms, "p90": ms, "p99": ms, "steps": n}`` or empty.
      reports: latest non-finite reports (``step``, ``nonfinite``, ``leaves``).
    """

    run: str
    process: int | None
    processes: tuple[int, ...] = ()
    width: int = 1
    headline: Headline = dataclasses.field(default_factory=Headline)
    contributions: pd.DataFrame = dataclasses.field(
        default_factory=lambda: _frame("step", "penalty", "value")
    )
    shares: pd.DataFrame = dataclasses.field(
        default_factory=lambda: _frame("penalty", "weighted", "share")
    )
    losses: pd.DataFrame = dataclasses.field(
        default_factory=lambda: _frame("step", "series", "value")
    )
    nonfinite_steps: pd.DataFrame = dataclasses.field(
        default_factory=lambda: _frame("step", "count")
    )
    grads: pd.DataFrame = dataclasses.field(
        default_factory=lambda: _frame("step", "term", "quantity", "value")
    )
    grad_wrt: str | None = None
    terms: pd.DataFrame = dataclasses.field(
        default_factory=lambda: _frame("term", "grad_norm", "grad_share", "grad_cosine", "status")
    )
    events: pd.DataFrame = dataclasses.field(
        default_factory=lambda: _frame(
            "step", "wall_time", "kind", "name", "severity", "message", "process"
        )
    )
    durations: pd.DataFrame = dataclasses.field(
        default_factory=lambda: _frame("step", "percentile", "ms")
    )
    duration_summary: dict[str, float] = dataclasses.field(default_factory=dict)
    reports: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when the run has no recorded step yet."""
        return self.headline.step is None


def total_nonfinite(
    series: Mapping[int, store.SeriesRow], buckets: Mapping[int, np.ndarray]
) -> float:
    """Non-finite detections so far: the sum of the ``_nonfinite`` step series."""
    return float(
        sum(
            np.nansum(buckets[sid]["vsum"])
            for sid, s in series.items()
            if s.key == "_nonfinite" and sid in buckets
        )
    )


def _gather(series: Mapping[int, store.SeriesRow], buckets: Mapping[int, np.ndarray]):
    """Series grouped by (pipeline, key) across processes, buckets combined."""
    groups: dict[tuple[str, str], list[int]] = {}
    for sid, s in series.items():
        groups.setdefault((s.pipeline, s.key), []).append(sid)
    out = {}
    for (pipeline, key), sids in groups.items():
        b = store.combine([buckets[sid] for sid in sids if sid in buckets])
        s = series[sids[0]]
        out[(pipeline, key)] = (s, b)
    return out


def _long(parts: list[tuple[dict[str, str], np.ndarray]], width: int) -> pd.DataFrame | None:
    """Long DataFrame of envelope points, one block of columns per labelled series."""
    frames = []
    for labels, b in parts:
        x, y = store.envelope(b, width)
        frame = pd.DataFrame({"step": x, "value": y})
        for k, v in labels.items():
            frame[k] = v
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else None


def _last_mean(b: np.ndarray) -> float:
    if not b.size:
        return float("nan")
    finite = np.flatnonzero(~np.isnan(store.mean(b)))
    return float(store.mean(b)[finite[-1]]) if finite.size else float("nan")


def build(
    *,
    run: str,
    process: int | None,
    runs: Sequence[store.RunRow],
    width: int,
    series: Mapping[int, store.SeriesRow],
    buckets: Mapping[int, np.ndarray],
    steps: Mapping[str, np.ndarray],
    events: Sequence[store.EventRow],
    reports: list[dict[str, Any]],
) -> Snapshot:
    """A :class:`Snapshot` from what an SQLite source has cached."""
    snap = Snapshot(
        run=run,
        process=process,
        width=width,
        processes=tuple(sorted(r.process for r in runs)),
        reports=reports,
    )
    groups = _gather(series, buckets)
    pipelines = {p for p, _ in groups}
    label = (lambda p, n: n) if len(pipelines) <= 1 else (lambda p, n: f"{p}/{n}")

    weighted = [
        (label(p, s.name), b)
        for (p, _), (s, b) in groups.items()
        if s.quantity == "weighted" and s.name
    ]
    df = _long([({"penalty": n}, b) for n, b in weighted], width)
    if df is not None:
        snap.contributions = df[["step", "penalty", "value"]]
        latest = {n: _last_mean(b) for n, b in weighted}
        total = sum(abs(v) for v in latest.values() if np.isfinite(v))
        snap.shares = pd.DataFrame(
            {
                "penalty": list(latest),
                "weighted": list(latest.values()),
                "share": [
                    abs(v) / total if total > 0 and np.isfinite(v) else np.nan
                    for v in latest.values()
                ],
            }
        )

    names = {"_loss": "base loss", "_total": "total penalty"}
    parts = [({"series": names[s.key]}, b) for (p, k), (s, b) in groups.items() if k in names]
    df = _long(parts, width)
    if df is not None:
        snap.losses = df.groupby(["step", "series"], as_index=False)["value"].mean()
    nf = [b for (p, k), (s, b) in groups.items() if k == "_nonfinite"]
    if nf:
        b = store.combine(nf)
        b = b[np.nan_to_num(b["vmax"]) > 0]
        snap.nonfinite_steps = pd.DataFrame(
            {"step": b["step_lo"].astype(float), "count": b["vsum"]}
        )

    term_parts = [
        (s, b) for (p, k), (s, b) in groups.items() if s.name and s.quantity in TERM_QUANTITIES
    ]
    snap.grad_wrt = "params" if term_parts else None
    if not term_parts:
        term_parts = [
            (s, b) for (p, k), (s, b) in groups.items() if s.name and s.quantity == "grad_norm"
        ]
        snap.grad_wrt = "input" if term_parts else None
    df = _long(
        [
            (
                {
                    "term": label(s.pipeline, s.name),
                    "quantity": "grad_norm" if s.quantity.endswith("grad_norm") else s.quantity,
                },
                b,
            )
            for s, b in term_parts
        ],
        width,
    )
    if df is not None:
        snap.grads = df[["step", "term", "quantity", "value"]]
        latest: dict[str, dict[str, float]] = {}
        for s, b in term_parts:
            q = "grad_norm" if s.quantity.endswith("grad_norm") else s.quantity
            latest.setdefault(label(s.pipeline, s.name), {})[q] = _last_mean(b)
        rows = []
        for term, q in latest.items():
            share, cosine = q.get("grad_share", np.nan), q.get("grad_cosine", np.nan)
            status = "ok"
            if not term.endswith("base") and share > DOMINANCE_THRESHOLD:
                status = "dominating"
            elif not term.endswith("base") and cosine < CONFLICT_COSINE:
                status = "conflicting"
            rows.append(
                {
                    "term": term,
                    "grad_norm": q.get("grad_norm", np.nan),
                    "grad_share": share,
                    "grad_cosine": cosine,
                    "status": status,
                }
            )
        snap.terms = pd.DataFrame(rows, columns=list(snap.terms.columns))

    process_of = {r.id: r.process for r in runs}
    if events:
        snap.events = pd.DataFrame(
            {
                "step": [e.step for e in events],
                "wall_time": [e.wall_time for e in events],
                "kind": [e.kind for e in events],
                "name": [e.name for e in events],
                "severity": [e.severity for e in events],
                "message": [e.message for e in events],
                "process": [process_of.get(e.run_id, 0) for e in events],
            }
        )

    h = snap.headline
    h.status = combine_statuses(r.status for r in runs)
    h.updated_at = max((r.updated_at for r in runs), default=None)
    h.nonfinite = int(total_nonfinite(series, buckets))
    if steps and steps.get("step") is not None and steps["step"].size:
        _headline_from_steps(h, steps)
        snap.durations, snap.duration_summary = _durations(steps)
    alerts = [e for e in events if e.kind in ("alert", "nonfinite")]
    h.alerts = len(alerts)
    h.open_alerts = _open_alerts(alerts, h.step, snap.terms, steps)
    return snap


def _headline_from_steps(h: Headline, steps: Mapping[str, np.ndarray]) -> None:
    """Current step, loss and total: the latest row of each process, averaged."""
    run_ids = steps["run_id"]
    last = [np.flatnonzero(run_ids == r)[-1] for r in np.unique(run_ids)]
    h.step = int(steps["step"][last].max())

    def avg(col: str) -> float | None:
        v = steps[col][last]
        return None if np.all(np.isnan(v)) else float(np.nanmean(v))

    h.loss, h.total = avg("loss"), avg("total")
    if h.loss is not None and h.total is not None and np.isfinite(h.loss + h.total):
        denom = abs(h.loss) + abs(h.total)
        h.penalty_share = abs(h.total) / denom if denom > 0 else None


def _durations(steps: Mapping[str, np.ndarray]) -> tuple[pd.DataFrame, dict[str, float]]:
    """p50/p90/p99 (ms) per sub-window of the recent steps, and over the whole window."""
    ok = np.isfinite(steps["duration_seconds"])
    if not ok.any():
        return _frame("step", "percentile", "ms"), {}
    step, ms = steps["step"][ok], steps["duration_seconds"][ok] * 1e3
    order = np.argsort(step, kind="stable")
    step, ms = step[order], ms[order]
    summary = {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}
    summary["steps"] = float(ms.size)
    chunk = max(1, ms.size // 40)
    rows = []
    for i in range(0, ms.size, chunk):
        part = ms[i : i + chunk]
        for q in (50, 90, 99):
            rows.append(
                (float(step[min(i + chunk, ms.size) - 1]), f"p{q}", float(np.percentile(part, q)))
            )
    return pd.DataFrame(rows, columns=["step", "percentile", "ms"]), summary


def _open_alerts(
    alerts: Sequence[store.EventRow],
    step: int | None,
    terms: pd.DataFrame,
    steps: Mapping[str, np.ndarray],
) -> int:
    """Alert episodes still open: recent (OPEN_ALERT_STEPS) or their condition still holds."""
    status = dict(zip(terms["term"], terms["status"], strict=True)) if len(terms) else {}
    latest_bad = bool(steps and steps["nonfinite"].size and steps["nonfinite"][-1] > 0)
    open_keys = set()
    for e in alerts:
        key = (e.run_id, e.name, str(e.attributes.get("penalty", e.attributes.get("metrics", ""))))
        penalty = e.attributes.get("penalty")
        holds = (
            (e.name == "GradientDominance" and status.get(penalty) == "dominating")
            or (e.name == "GradientConflict" and status.get(penalty) == "conflicting")
            or (e.kind == "nonfinite" and latest_bad)
        )
        recent = step is not None and step - e.step < OPEN_ALERT_STEPS
        if holds or recent:
            open_keys.add(key)
        else:
            open_keys.discard(key)
    return len(open_keys)
