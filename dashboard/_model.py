"""One data model of a run, whatever source read it, and the figures derived from it.

Each source (``_sqlite_source.py``, ``prom_source.py``) fills a :class:`Snapshot` with
what it *read*: tidy long DataFrames (NaN for gaps, never ±Inf), the latest reading of
each penalty and term, the non-finite buckets, events and durations. :func:`derive` then
computes everything *derived* — shares, term statuses, the penalty share of the loss,
non-finite step and episode counts, the first non-finite step, open alerts and what needs
attention — once, the same way for both sources, with thresholds from
:mod:`penwatch.schema.thresholds`.

Signed shares (a bonus term, i.e. a negative weighted penalty): a penalty's share is its
weighted value over the sum of the *magnitudes* of all weighted penalties,
``s_i = w_i / Σ_j |w_j|`` — in ``[-1, 1]``, ``Σ |s_i| = 1``, negative for a bonus. The
penalty share of the loss is ``total / (|base loss| + Σ_j |w_j|)``, which is the usual
``total / (loss + total)`` when every term is a cost and stays in ``[-1, 1]`` otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import numpy as np
import pandas as pd
from penwatch.dashboard._runs import LIVE

from penwatch.schema import BASE_TERM, thresholds

__all__ = [
    "ALL_PROCESSES",
    "OPEN_ALERT_STEPS",
    "Attention",
    "Headline",
    "NonFiniteSummary",
    "Snapshot",
    "derive",
    "frame",
]

ALL_PROCESSES = None
"""``process`` value meaning every process of the run, aggregated."""

OPEN_ALERT_STEPS = 500
"""An alert episode counts as open while fewer steps than this have passed since it
fired, or while its condition (dominance, conflict, non-finite) still holds."""

GRAD_QUANTITIES = ("grad_norm", "grad_share", "grad_cosine")
"""The per-term gradient quantities the views draw (``grad_norm``: the parameter-
gradient norm for SPEC §4 terms, the input-gradient norm for §3 penalties)."""

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
    "run",
    "capsule",
    "replay",
}


def frame(*columns: str) -> pd.DataFrame:
    """An empty DataFrame with the given columns (text or float, by name)."""
    return _empty(columns).copy(deep=False)


@functools.lru_cache(maxsize=64)
def _empty(columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object if c in _TEXT else float) for c in columns})


@dataclasses.dataclass
class Headline:
    """The numbers at the top of the page (None where unknown).

    Attributes:
      step: the furthest recorded step.
      loss: the base (task) loss at the latest step (mean over processes).
      total: the total weighted penalty at the latest step.
      penalty_share: ``total / (|loss| + Σ|w_i|)`` (:func:`derive`), signed.
      alerts: alert and non-finite episodes fired so far.
      open_alerts: those still open (:data:`OPEN_ALERT_STEPS`).
      status: the run's status (``running`` is live).
      updated_at: the latest heartbeat (Unix time).
      last_step_at: when the latest step was recorded (Unix time; a stalled training
        loop keeps its heartbeat but records no step).
    """

    step: int | None = None
    loss: float | None = None
    total: float | None = None
    penalty_share: float | None = None
    alerts: int = 0
    open_alerts: int = 0
    status: str = "unknown"
    updated_at: float | None = None
    last_step_at: float | None = None

    @property
    def live(self) -> bool:
        """True while the run (some process of it) is still being written."""
        return self.status == LIVE


@dataclasses.dataclass
class NonFiniteSummary:
    """Non-finite *steps* and *episodes* (SPEC §6: counts of steps, not metric values).

    Attributes:
      steps: non-finite steps, at least (exact when ``exact``).
      steps_max: at most this many (equal to ``steps`` when exact).
      episodes: runs of consecutive non-finite steps (at least, when not exact).
      first_step: the first non-finite step, or None.
      exact: False when the source only had downsampled buckets or scrape intervals.
    """

    steps: int = 0
    steps_max: int = 0
    episodes: int = 0
    first_step: int | None = None
    exact: bool = True


@dataclasses.dataclass(frozen=True)
class Attention:
    """One thing on the page that needs attention, in words.

    ``level`` is ``error`` or ``warning``; ``what`` is one of ``nonfinite``,
    ``dominance``, ``conflict``, ``tug_of_war``, ``collapse``, ``stalled``; ``subject``
    is the user's name it concerns (plain text, escaped by the page) or ``""``;
    ``detail`` is fixed text with numbers.
    """

    level: str
    what: str
    subject: str
    detail: str


@dataclasses.dataclass
class Snapshot:
    """Everything the views draw for one run selection.

    Read by the source:
      width: downsampling bucket width in steps (1: every step is drawn).
      contributions: ``step, penalty, value`` — weighted penalty values (stackable).
      losses: ``step, series, value`` — base loss and total penalty.
      nonfinite_buckets: ``step, step_hi, count, bad_min, bad_max`` — step ranges that
        held non-finite values, with the number of non-finite steps in each (between
        ``bad_min`` and ``bad_max``; equal when known exactly).
      nonfinite_located: False when the source only locates non-finite steps
        approximately (Prometheus: by scrapes), so no count is exact.
      grads: ``step, term, quantity, value`` — gradient norms/shares/cosines per term.
      grad_wrt: ``"params"`` (SPEC §4 terms), ``"input"`` (§3 norms) or None.
      latest: ``group, name, value`` — the last finite reading of each penalty's
        weighted value (``group="weighted"``) and each term's gradient quantities.
      base_terms: the term labels that are the task loss's own gradient.
      events: ``step, wall_time, kind, name, severity, message, process, penalty,
        capsule, replay`` — alert and non-finite episodes.
      durations: ``step, percentile, ms`` — device-time p50/p90/p99 over the recent window.
      duration_summary: ``{"p50": ms, "p90": ms, "p99": ms, "steps": n}`` or empty.
      reports: latest non-finite reports (``step``, ``nonfinite``, ``leaves``).
      extra_attention: things a source saw that :func:`derive` cannot.

    Derived (:func:`derive`):
      shares: ``penalty, weighted, share`` — signed share of the penalties' magnitude.
      terms: ``term, grad_norm, grad_share, grad_cosine, status``.
      nonfinite: a :class:`NonFiniteSummary`.
      attention: what needs attention, most severe first.
    """

    run: str
    process: int | None
    processes: tuple[int, ...] = ()
    width: int = 1
    headline: Headline = dataclasses.field(default_factory=Headline)
    contributions: pd.DataFrame = dataclasses.field(
        default_factory=lambda: frame("step", "penalty", "value")
    )
    losses: pd.DataFrame = dataclasses.field(
        default_factory=lambda: frame("step", "series", "value")
    )
    nonfinite_buckets: pd.DataFrame = dataclasses.field(
        default_factory=lambda: frame("step", "step_hi", "count", "bad_min", "bad_max")
    )
    nonfinite_located: bool = True
    grads: pd.DataFrame = dataclasses.field(
        default_factory=lambda: frame("step", "term", "quantity", "value")
    )
    grad_wrt: str | None = None
    latest: pd.DataFrame = dataclasses.field(
        default_factory=lambda: frame("group", "name", "value")
    )
    base_terms: frozenset[str] = frozenset({BASE_TERM})
    events: pd.DataFrame = dataclasses.field(
        default_factory=lambda: frame(
            "step",
            "wall_time",
            "kind",
            "name",
            "severity",
            "message",
            "process",
            "penalty",
            "capsule",
            "replay",
        )
    )
    durations: pd.DataFrame = dataclasses.field(
        default_factory=lambda: frame("step", "percentile", "ms")
    )
    duration_summary: dict[str, float] = dataclasses.field(default_factory=dict)
    reports: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    extra_attention: list[Attention] = dataclasses.field(default_factory=list)
    # derived
    shares: pd.DataFrame = dataclasses.field(
        default_factory=lambda: frame("penalty", "weighted", "share")
    )
    terms: pd.DataFrame = dataclasses.field(
        default_factory=lambda: frame("term", "grad_norm", "grad_share", "grad_cosine", "status")
    )
    nonfinite: NonFiniteSummary = dataclasses.field(default_factory=NonFiniteSummary)
    attention: list[Attention] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when the run has no recorded step yet."""
        return self.headline.step is None

    @property
    def nonfinite_steps(self) -> pd.DataFrame:
        """``step, count`` — where non-finite values were recorded (chart markers)."""
        return self.nonfinite_buckets[["step", "count"]]


def derive(
    snap: Snapshot, *, stale_after: float | None = None, now: float | None = None
) -> Snapshot:
    """Fill the derived fields of ``snap`` from what its source read (in place; returned).

    Args:
      snap: a snapshot whose read fields are filled.
      stale_after: seconds without a step after which a live run reads as stalled.
      now: the time staleness is judged against (default: now).
    """
    latest = snap.latest
    weighted = latest[latest["group"] == "weighted"]
    values = weighted["value"].to_numpy(dtype=float)
    magnitude = float(np.nansum(np.abs(values)))
    snap.shares = pd.DataFrame(
        {
            "penalty": weighted["name"].tolist(),
            "weighted": values,
            "share": values / magnitude if magnitude > 0 else np.full(values.size, np.nan),
        }
    )
    h = snap.headline
    h.penalty_share = None
    if h.loss is not None and h.total is not None and np.isfinite(h.loss + h.total):
        denom = abs(h.loss) + (magnitude if magnitude > 0 else abs(h.total))
        h.penalty_share = h.total / denom if denom > 0 else None
    snap.terms = _terms(snap)
    snap.nonfinite = _nonfinite(snap)
    _alerts(snap)
    snap.attention = _attention(snap, stale_after=stale_after, now=now)
    return snap


def _terms(snap: Snapshot) -> pd.DataFrame:
    latest = snap.latest[snap.latest["group"].isin(GRAD_QUANTITIES)]
    rows = []
    for term, part in latest.groupby("name", sort=False):
        q = dict(zip(part["group"], part["value"], strict=True))
        share, cosine = q.get("grad_share", np.nan), q.get("grad_cosine", np.nan)
        status = "ok"
        if term not in snap.base_terms:
            if share > thresholds.DOMINANCE_SHARE:
                status = "dominating"
            elif cosine < thresholds.CONFLICT_COSINE:
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
    rows.sort(key=lambda row: row["term"])  # the same order whichever source read them
    return pd.DataFrame(rows, columns=["term", "grad_norm", "grad_share", "grad_cosine", "status"])


def _nonfinite(snap: Snapshot) -> NonFiniteSummary:
    b = snap.nonfinite_buckets.sort_values("step")
    nf_events = snap.events[snap.events["kind"] == "nonfinite"]
    if b.empty and nf_events.empty:
        return NonFiniteSummary()
    exact = bool((b["bad_min"] == b["bad_max"]).all()) if len(b) else False
    exact = exact and snap.nonfinite_located
    steps = int(b["bad_min"].sum()) if len(b) else 0
    steps_max = int(b["bad_max"].sum()) if len(b) else 0
    # an episode: consecutive non-finite steps (a bucket range touching the previous one)
    lo, hi = b["step"].to_numpy(dtype=float), b["step_hi"].to_numpy(dtype=float)
    episodes = int(lo.size and 1 + np.count_nonzero(lo[1:] > hi[:-1] + 1))
    first = int(lo[0]) if lo.size else None
    if not nf_events.empty:  # the NonFinite alert fires once per episode, at its first step
        event_steps = sorted({int(s) for s in nf_events["step"]})
        if not exact or not lo.size:
            episodes = max(episodes, len(event_steps))
        first = event_steps[0] if first is None else min(first, event_steps[0])
        steps = max(steps, 1)
        steps_max = max(steps_max, steps)
    return NonFiniteSummary(steps, steps_max, episodes, first, exact)


def _alerts(snap: Snapshot) -> None:
    """Fired alert episodes and those still open (recent, or their condition holds)."""
    h, events = snap.headline, snap.events
    h.alerts = len(events)
    if not len(events):
        h.open_alerts = 0
        return
    status = dict(zip(snap.terms["term"], snap.terms["status"], strict=True))
    b = snap.nonfinite_buckets
    latest_bad = bool(len(b) and h.step is not None and b["step_hi"].max() >= h.step)
    open_keys = set()
    for e in events.sort_values("step", kind="stable").itertuples():
        penalty = e.penalty if isinstance(e.penalty, str) else None
        key = (e.process, e.name, penalty)
        holds = (
            (e.name == "GradientDominance" and status.get(penalty) == "dominating")
            or (e.name == "GradientConflict" and status.get(penalty) == "conflicting")
            or (e.kind == "nonfinite" and latest_bad)
        )
        recent = h.step is not None and h.step - e.step < OPEN_ALERT_STEPS
        if holds or recent:
            open_keys.add(key)
        else:
            open_keys.discard(key)
    h.open_alerts = len(open_keys)


def _attention(snap: Snapshot, *, stale_after: float | None, now: float | None) -> list[Attention]:
    out = []
    nf = snap.nonfinite
    if nf.steps:
        count = f"{nf.steps:,}" if nf.exact else f"{nf.steps:,}–{nf.steps_max:,}"
        out.append(
            Attention(
                "error",
                "nonfinite",
                "",
                f"{count} non-finite step{'s' if nf.steps_max != 1 else ''} in "
                f"{'' if nf.exact else 'at least '}{nf.episodes:,} "
                f"episode{'s' if nf.episodes != 1 else ''}; the first at step {nf.first_step:,}.",
            )
        )
    for row in snap.terms.itertuples():
        if row.status == "dominating":
            out.append(
                Attention(
                    "warning",
                    "dominance",
                    row.term,
                    f"dominates the gradient: share {row.grad_share:.2f} of the update "
                    f"(> {thresholds.DOMINANCE_SHARE:g}).",
                )
            )
        elif row.status == "conflicting":
            out.append(
                Attention(
                    "warning",
                    "conflict",
                    row.term,
                    f"conflicts with the task loss: cosine {row.grad_cosine:.2f} to the "
                    f"base-loss gradient (< {thresholds.CONFLICT_COSINE:g}).",
                )
            )
    out.extend(snap.extra_attention)
    named = {"GradientTugOfWar": "tug_of_war", "ActivityCollapse": "collapse"}
    seen = set()
    for e in snap.events[snap.events["name"].isin(list(named))].itertuples():
        subject = e.penalty if isinstance(e.penalty, str) else ""
        if (e.name, subject) in seen:
            continue
        seen.add((e.name, subject))
        what = named[e.name]
        detail = "tug of war with the task loss" if what == "tug_of_war" else "activity collapse"
        out.append(Attention("warning", what, subject, f"{detail} since step {int(e.step):,}."))
    h = snap.headline
    last = h.last_step_at if h.last_step_at is not None else h.updated_at
    if h.live and stale_after is not None and last is not None:
        idle = (time.time() if now is None else now) - last
        if idle > stale_after / 2:
            out.append(
                Attention(
                    "warning",
                    "stalled",
                    "",
                    f"no step recorded for {idle:.0f} s (the run reads as crashed after "
                    f"{stale_after:g} s without a heartbeat).",
                )
            )
    return out
