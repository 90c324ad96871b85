"""A dashboard source reading a Prometheus server over its HTTP API (PromQL).

Uses the SPEC §6 metric names (``penwatch_step``, ``penwatch_loss``,
``penwatch_penalty_weighted_value``, ``penwatch_pipeline_value``,
``penwatch_penalty_grad_norm`` / ``_grad_share`` / ``_grad_cosine``,
``penwatch_nonfinite_total``, ``penwatch_alerts_total``,
``penwatch_pipeline_compute_duration_seconds_bucket``, ``penwatch_last_step_timestamp_seconds``)
with labels ``run``, ``process``, ``pipeline``, ``penalty``.

Everything is read over the **lookback** (default one hour), so a run that ended minutes
ago — whose series Prometheus already calls stale, so an instant query no longer sees
them — is still listed and drawn: runs are listed from a range query, charts come from
range queries at about ``max_points`` points (each refresh asks only for the time since
the previous one), and latest values are ``last_over_time`` of the *finite* samples
over the lookback (a NaN diagnostics step is a gap, never a latest value). Times map to
training steps through ``penwatch_step``. Chart values are ``max_over_time`` per
resolution step, so spikes stay visible (shares and cosines: the last finite reading).

Non-finite steps come from ``penwatch_nonfinite_total``: an increase between two samples
means at least one non-finite step in that step range (after the step seen two samples
earlier, up to the step seen with the increase). This is located by scrapes, so it is
approximate: the step gauge and the counter need not reach the same scrape. Episodes
and alerts come from ``penwatch_alerts_total`` (the NonFinite alert counts once per
episode). Derived figures are computed by
:func:`penwatch.dashboard._model.derive`, as for the SQLite store.

Prometheus keeps no run status: a run whose last step is older than ``stale_after``
seconds is ``idle`` (finished, stopped or crashed: Prometheus cannot tell), otherwise
``running``.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
import pandas as pd
from penwatch.dashboard import _model
from penwatch.dashboard._errors import SourceUnavailable
from penwatch.dashboard._model import Snapshot
from penwatch.dashboard._runs import RunChoice

from penwatch.schema import BASE_TERM, group_key, penalty_key, term_key, thresholds

__all__ = ["PrometheusSource"]

Series = dict[tuple[tuple[str, str], ...], dict[float, float]]

_FINITE = "> -Inf < +Inf"
"""PromQL comparison filters that drop NaN and ±Inf samples."""

_SELECTOR = re.compile(r"(penwatch_[a-z_]+\{[^}]*\})")
"""A metric selector in an expression (to wrap it in a range function)."""

_NONFINITE_ALERT = "NonFinite"
"""The ``alert`` label of non-finite episodes in ``penwatch_alerts_total``."""


class PrometheusSource:
    """Reads penwatch metrics from Prometheus (``/api/v1/query`` and ``/query_range``).

    Args:
      url: base URL of the Prometheus server, e.g. ``http://127.0.0.1:9090``.
      lookback: seconds of history listed and drawn.
      max_points: about how many points per series.
      timeout: HTTP timeout in seconds.
      stale_after: seconds without a recorded step after which a run reads as ``idle``.
    """

    def __init__(
        self,
        url: str,
        *,
        lookback: float = 3600.0,
        max_points: int = 400,
        timeout: float = 5.0,
        stale_after: float = thresholds.STALE_AFTER_SECONDS,
    ) -> None:
        self.url = url.rstrip("/")
        self.label = f"Prometheus {self.url}"
        self.lookback, self.max_points, self.timeout = lookback, max_points, timeout
        self.stale_after = stale_after
        self.resolution = max(1, math.ceil(lookback / max_points))
        self._ranges: dict[str, tuple[float, Series]] = {}

    # --- HTTP -------------------------------------------------------------------------

    def _api(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=self.timeout) as r:
                body = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SourceUnavailable(f"Prometheus at {self.url} is not answering ({exc}).") from exc
        if body.get("status") != "success":
            raise SourceUnavailable(f"Prometheus query failed: {body.get('error', body)}")
        return body["data"]["result"]

    def instant(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """``(labels, value)`` of an instant query (now)."""
        return [
            (r["metric"], float(r["value"][1])) for r in self._api("/api/v1/query", {"query": expr})
        ]

    def latest(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """The last finite sample of ``expr`` within the lookback, per series."""
        # a one-second subquery grid: a coarser one can step over all of a short run's
        # samples (its last point precedes them, and staleness markers follow them)
        # The raw last samples first (``last_over_time`` over the lookback: the newest
        # sample whatever the grid, staleness markers skipped, so a run that just ended or
        # lasted under a second is read whole) ...
        raw = _SELECTOR.sub(rf"last_over_time(\1[{int(self.lookback)}s])", expr)
        found = self.instant(f"({raw}) {_FINITE}")
        if found:
            return found
        # ... and when the newest is not finite, the last finite reading on a 1 s grid.
        return self.instant(f"last_over_time(({expr} {_FINITE})[{int(self.lookback)}s:1s])")

    def range(self, expr: str) -> Series:
        """``{labels: {time: value}}`` over the lookback, fetching only what is new."""
        now = time.time()
        res = self.resolution
        since, cached = self._ranges.get(expr, (now - self.lookback, {}))
        start = math.floor(max(since - res, now - self.lookback) / res) * res
        result = self._api(
            "/api/v1/query_range", {"query": expr, "start": start, "end": now, "step": res}
        )
        for r in result:
            key = tuple(sorted(r["metric"].items()))
            points = cached.setdefault(key, {})
            for t, v in r["values"]:
                points[float(t)] = float(v)
        horizon = now - self.lookback
        for points in cached.values():
            for t in [t for t in points if t < horizon]:
                del points[t]
        self._ranges[expr] = (now, cached)
        return cached

    # --- Source interface -------------------------------------------------------------

    def runs(self) -> list[RunChoice]:
        """Every run with a recorded step in the lookback, most recently updated first.

        Raw range vectors (``last_over_time(x[lookback])``): they hold every sample of the
        lookback whatever the resolution grid, and skip the staleness markers written
        when a trainer stops, so a run that lasted less than one resolution step, or
        ended an hour ago, is listed.
        """
        window = f"{int(self.lookback)}s"

        def last(metric: str) -> dict[tuple[str, str], float]:
            expr = f"max by (run, process) (last_over_time({metric}[{window}]))"
            return {
                (labels.get("run", ""), labels.get("process", "0")): value
                for labels, value in self.instant(expr)
            }

        last_step = last("penwatch_step")
        last_stamp = last("penwatch_last_step_timestamp_seconds")
        by: dict[str, list[tuple[int, float, float]]] = {}
        for (run, process), step in last_step.items():
            stamp = last_stamp.get((run, process), 0.0)
            by.setdefault(run, []).append((int(process or 0), step, stamp))
        out = []
        now = time.time()
        for name, rows in by.items():
            updated = max(r[2] for r in rows)
            status = "running" if now - updated <= self.stale_after else "idle"
            out.append(
                RunChoice(
                    name,
                    tuple(sorted(r[0] for r in rows)),
                    status,
                    int(max(r[1] for r in rows)),
                    updated,
                )
            )
        return sorted(out, key=lambda c: -c.updated_at)

    def snapshot(self, run: str, process: int | None) -> Snapshot:
        """Everything the views draw for ``run`` (``process=None``: all processes)."""
        sel = f'run="{_esc(run)}"' + ("" if process is None else f',process="{process}"')
        w = f"{self.resolution}s"
        choice = next((r for r in self.runs() if r.name == run), None)
        snap = Snapshot(
            run=run, process=process, width=1, processes=choice.processes if choice else ()
        )
        times, steps = self._step_map(f"max(max_over_time(penwatch_step{{{sel}}}[{w}]))")
        if times.size:
            # Prometheus samples at its scrape times: one point per resolution step
            snap.width = max(1, int(np.ceil(np.nanmax(np.diff(steps), initial=1))))
        at = _Steps(times, steps)
        by = "pipeline, penalty"
        weighted = f"avg by ({by}) (penwatch_penalty_weighted_value{{{sel}}})"
        multi = len({m.get("pipeline") for m, _ in self.latest(weighted)}) > 1

        def who(labels: dict[str, str], label: str) -> str:
            name = labels.get(label, "")
            return f"{labels.get('pipeline')}/{name}" if multi else name

        def frame(expr: str, column: str | None, name: str) -> pd.DataFrame:
            rows = []
            for key, points in self.range(expr).items():
                labels = dict(key)
                label = who(labels, "penalty") if column else name
                rows += [(at(t), label, v) for t, v in sorted(points.items())]
            df = pd.DataFrame(rows, columns=["step", column or "series", "value"])
            return df.dropna(subset=["step"]).replace([np.inf, -np.inf], np.nan)

        snap.contributions = frame(
            f"avg by ({by}) (max_over_time(penwatch_penalty_weighted_value{{{sel}}}[{w}]))",
            "penalty",
            "penalty",
        )
        loss = frame(f"avg(max_over_time(penwatch_loss{{{sel}}}[{w}]))", None, "base loss")
        total = frame(
            f"sum(avg by (pipeline) (max_over_time(penwatch_pipeline_value{{{sel}}}[{w}])))",
            None,
            "total penalty",
        )
        snap.losses = pd.concat([loss, total], ignore_index=True)
        latest = [("weighted", who(m, "penalty"), v) for m, v in self.latest(weighted)]
        latest += self._grads(snap, sel, w, frame, who)
        snap.latest = pd.DataFrame(latest, columns=["group", "name", "value"])
        self._nonfinite(snap, sel, w, at)
        self._events(snap, sel, w, at)
        self._durations(snap, sel, at)
        self._headline(snap, sel, choice)
        return _model.derive(snap, stale_after=self.stale_after)

    def diagnostics_steps(self, run: str, process: int | None) -> list[int]:
        """No step can be picked: Prometheus keeps the latest readings, not one step's
        values, and no term Gram matrix (only pairwise cosines)."""
        return []

    def step_values(
        self, run: str, process: int | None, step: int | None
    ) -> tuple[int, str, dict[str, float]] | None:
        """The latest readings of the dominance figures as record keys, ``(step, where,
        values)``: per term ``param_grad_norm``, ``grad_share``, ``grad_cosine``,
        ``update_share``, ``suggested_weight``, per-group norms and penalty weights; of
        the first pipeline (by name) that has them, averaged over processes. None for a
        given ``step`` (Prometheus has no per-step values) or when nothing was exported."""
        if step is not None:
            return None
        sel = f'run="{_esc(run)}"' + ("" if process is None else f',process="{process}"')
        by = "pipeline, penalty"
        found: dict[str, dict[str, float]] = {}

        def read(metric: str, key, extra: str = "", labels: str = by) -> None:
            for m, v in self.latest(f"avg by ({labels}) ({metric}{{{sel}{extra}}})"):
                found.setdefault(m.get("pipeline", ""), {})[key(m)] = v

        read(
            "penwatch_penalty_grad_norm",
            lambda m: term_key(m["penalty"], "param_grad_norm"),
            ',wrt="params"',
        )
        for q in ("grad_share", "grad_cosine", "update_share", "suggested_weight"):
            read(f"penwatch_penalty_{q}", lambda m, q=q: term_key(m["penalty"], q))
        read("penwatch_penalty_weight", lambda m: penalty_key(m["penalty"], "weight"))
        read(
            "penwatch_penalty_group_grad_norm",
            lambda m: group_key(m["penalty"], m.get("group", "")),
            labels=f"{by}, group",
        )
        key = term_key(BASE_TERM, "grad_share")
        for pipeline in sorted(found):
            if key in found[pipeline]:
                step_now = self.latest(f"max(penwatch_step{{{sel}}})")
                at = int(step_now[0][1]) if step_now else 0
                return at, f"latest readings, pipeline {pipeline}", found[pipeline]
        return None

    # --- pieces -----------------------------------------------------------------------

    def _step_map(self, expr: str) -> tuple[np.ndarray, np.ndarray]:
        points: dict[float, float] = {}
        for p in self.range(expr).values():
            points.update(p)
        t = np.array(sorted(points))
        return t, np.array([points[x] for x in t])

    def _grads(self, snap: Snapshot, sel: str, w: str, frame, who) -> list:
        by = "pipeline, penalty"
        for wrt in ("params", "input"):
            base = f'penwatch_penalty_grad_norm{{{sel},wrt="{wrt}"}}'
            norms = frame(f"avg by ({by}) (max_over_time({base}[{w}]))", "term", "term")
            if len(norms):
                break
        if not len(norms):
            return []
        snap.grad_wrt = wrt
        parts = [norms.assign(quantity="grad_norm")]
        latest = [
            ("grad_norm", who(m, "penalty"), v) for m, v in self.latest(f"avg by ({by}) ({base})")
        ]
        if wrt == "params":
            for q in ("grad_share", "grad_cosine"):
                metric = f"penwatch_penalty_{q}{{{sel}}}"
                # the last reading per resolution step; a NaN diagnostics step is a gap
                expr = f"avg by ({by}) (last_over_time({metric}[{w}])) {_FINITE}"
                part = frame(expr, "term", "term")
                parts.append(part.assign(quantity=q))
                latest += [
                    (q, who(m, "penalty"), v) for m, v in self.latest(f"avg by ({by}) ({metric})")
                ]
        snap.grads = pd.concat(parts, ignore_index=True)[["step", "term", "quantity", "value"]]
        snap.base_terms = frozenset(
            t for t in snap.grads["term"].unique() if t.split("/")[-1] == BASE_TERM
        )
        return latest

    def _nonfinite(self, snap: Snapshot, sel: str, w: str, at: _Steps) -> None:
        snap.nonfinite_located = False  # by scrapes: approximate
        rows = []
        expr = f"sum(max_over_time(penwatch_nonfinite_total{{{sel}}}[{w}]))"
        for points in self.range(expr).values():
            prev_t, prev_v = None, 0.0
            for t, v in sorted(points.items()):
                if v > prev_v:
                    # the new non-finite steps lie after the step seen two samples
                    # earlier (one sample of slack: the step gauge and the counter of
                    # one record need not reach the same scrape), or from the run's
                    # first known step when there was no such sample
                    earlier = (prev_t if prev_t is not None else t) - self.resolution
                    hi, before = at(t), at(earlier)
                    lo = min(hi, before + 1 if math.isfinite(before) else at.first)
                    rows.append((lo, hi, v - prev_v, 1.0, hi - lo + 1))
                prev_t, prev_v = t, v
        if rows:
            snap.nonfinite_buckets = pd.DataFrame(
                rows, columns=["step", "step_hi", "count", "bad_min", "bad_max"]
            ).dropna()

    def _events(self, snap: Snapshot, sel: str, w: str, at: _Steps) -> None:
        rows = []
        expr = f"sum by (alert, process) (max_over_time(penwatch_alerts_total{{{sel}}}[{w}]))"
        for key, points in self.range(expr).items():
            labels = dict(key)
            name = labels.get("alert", "alert")
            kind = "nonfinite" if name == _NONFINITE_ALERT else "alert"
            prev = 0.0
            for t, v in sorted(points.items()):
                if v > prev:
                    rows.append(
                        {
                            "step": at(t),
                            "wall_time": t,
                            "kind": kind,
                            "name": name,
                            "severity": "critical" if kind == "nonfinite" else "warning",
                            "message": f"{name} fired ({v - prev:g}× by this scrape)",
                            "process": int(labels.get("process", 0) or 0),
                            "penalty": None,
                            "capsule": None,
                            "replay": None,
                        }
                    )
                prev = v
        if rows:
            snap.events = pd.DataFrame(rows, columns=list(snap.events.columns)).dropna(
                subset=["step"]
            )

    def _durations(self, snap: Snapshot, sel: str, at: _Steps) -> None:
        window = f"{max(4 * self.resolution, 60)}s"
        parts = []
        buckets = f"penwatch_pipeline_compute_duration_seconds_bucket{{{sel}}}"
        for q in (50, 90, 99):
            expr = f"histogram_quantile({q / 100}, sum by (le) (rate({buckets}[{window}])))"
            for points in self.range(expr).values():
                parts += [
                    (at(t), f"p{q}", v * 1e3) for t, v in sorted(points.items()) if math.isfinite(v)
                ]
        whole = f"{int(self.lookback)}s"
        for q in (50, 90, 99):
            expr = f"histogram_quantile({q / 100}, sum by (le) (increase({buckets}[{whole}])))"
            value = self.instant(expr)
            if value and math.isfinite(value[0][1]):
                snap.duration_summary[f"p{q}"] = value[0][1] * 1e3
        count = self.instant(
            f"sum(increase(penwatch_pipeline_compute_duration_seconds_count{{{sel}}}[{whole}]))"
        )
        if len(snap.duration_summary) == 3 and count:
            snap.duration_summary["steps"] = float(round(count[0][1]))
        else:
            snap.duration_summary = {}
        snap.durations = pd.DataFrame(parts, columns=["step", "percentile", "ms"]).dropna()

    def _headline(self, snap: Snapshot, sel: str, choice: RunChoice | None) -> None:
        def one(expr: str) -> float | None:
            r = self.latest(expr)
            return r[0][1] if r else None

        def raw(metric: str) -> float | None:  # the last sample, off the grid (see runs)
            r = self.instant(f"max(last_over_time({metric}{{{sel}}}[{int(self.lookback)}s]))")
            return r[0][1] if r else None

        h = snap.headline
        step = raw("penwatch_step")
        h.step = None if step is None else int(step)
        h.loss = one(f"avg(penwatch_loss{{{sel}}})")
        h.total = one(f"sum(avg by (pipeline) (penwatch_pipeline_value{{{sel}}}))")
        h.updated_at = raw("penwatch_last_step_timestamp_seconds")
        h.last_step_at = h.updated_at
        h.status = choice.status if choice else "unknown"


class _Steps:
    """The training step at a time: the last ``penwatch_step`` sample at or before it."""

    def __init__(self, times: np.ndarray, steps: np.ndarray) -> None:
        self.times, self.steps = times, steps
        self.first = float(steps.min()) if steps.size else float("nan")

    def __call__(self, t: float | None) -> float:
        if t is None or not self.times.size:
            return float("nan")
        i = int(np.searchsorted(self.times, t, side="right")) - 1
        return float(self.steps[i]) if i >= 0 else float("nan")


def _esc(value: str) -> str:
    """A PromQL string literal body."""
    return value.replace("\\", "\\\\").replace('"', '\\"')
