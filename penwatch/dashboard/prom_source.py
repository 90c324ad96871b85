"""A dashboard source reading a Prometheus server over its HTTP API (PromQL).

Uses the SPEC §6 metric names (``penwatch_step``, ``penwatch_loss``,
``penwatch_penalty_weighted_value``, ``penwatch_pipeline_value``,
``penwatch_penalty_grad_norm`` / ``_grad_share`` / ``_grad_cosine``,
``penwatch_nonfinite_total``, ``penwatch_alerts_total``,
``penwatch_pipeline_compute_duration_seconds_bucket``, ``penwatch_last_step_timestamp_seconds``)
with labels ``run``, ``process``, ``pipeline``, ``penalty``. Range queries cover the last
``lookback`` seconds at a resolution of about ``max_points`` points; each refresh asks
only for the time since the previous one. Times are mapped to training steps through
``penwatch_step``. Spikes stay visible: values are ``max_over_time`` per resolution step
(shares and cosines ``avg_over_time``). Open alerts are Prometheus's own firing
``ALERTS`` for the run (from the ``deploy/`` rules), when there are any.

Prometheus keeps no run status: a run whose last step is older than ``stale_after``
seconds is ``idle`` (finished, stopped or crashed: Prometheus cannot tell), otherwise
``running``.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
import pandas as pd

from penwatch.dashboard import _snapshot
from penwatch.dashboard._errors import SourceUnavailable
from penwatch.dashboard._runs import RunChoice
from penwatch.dashboard._snapshot import Snapshot
from penwatch.schema import thresholds

__all__ = ["PrometheusSource"]

Series = dict[tuple[tuple[str, str], ...], dict[float, float]]


class PrometheusSource:
    """Reads penwatch metrics from Prometheus (``/api/v1/query`` and ``/query_range``).

    Args:
      url: base URL of the Prometheus server, e.g. ``http://127.0.0.1:9090``.
      lookback: seconds of history drawn.
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
        """``(labels, value)`` of an instant query."""
        return [
            (r["metric"], float(r["value"][1])) for r in self._api("/api/v1/query", {"query": expr})
        ]

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
        steps = self.instant("max by (run, process) (penwatch_step)")
        stamps = {
            (m.get("run"), m.get("process")): v
            for m, v in self.instant("max by (run, process) (penwatch_last_step_timestamp_seconds)")
        }
        by: dict[str, list[tuple[int, float, float]]] = {}
        for m, v in steps:
            key = (m.get("run", ""), m.get("process", "0"))
            by.setdefault(key[0], []).append((int(key[1] or 0), v, stamps.get(key, 0.0)))
        out = []
        for name, rows in by.items():
            updated = max(r[2] for r in rows)
            status = "running" if time.time() - updated <= self.stale_after else "idle"
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
        sel = f'run="{_esc(run)}"' + ("" if process is None else f',process="{process}"')
        w = f"{self.resolution}s"
        runs = self.runs()
        choice = next((r for r in runs if r.name == run), None)
        snap = Snapshot(
            run=run, process=process, width=1, processes=choice.processes if choice else ()
        )
        times, steps = self._step_map(f"max(max_over_time(penwatch_step{{{sel}}}[{w}]))")

        def frame(expr: str, label: str | None, name: str) -> pd.DataFrame:
            rows = []
            for key, points in self.range(expr).items():
                labels = dict(key)
                who = labels.get(label, name) if label else name
                if (
                    label == "penalty"
                    and len({dict(k).get("pipeline") for k in self._ranges[expr][1]}) > 1
                ):
                    who = f"{labels.get('pipeline')}/{who}"
                for t, v in sorted(points.items()):
                    rows.append((_at(times, steps, t), who, v))
            df = pd.DataFrame(rows, columns=["step", name, "value"])
            return df.dropna(subset=["step"]).replace([np.inf, -np.inf], np.nan)

        by = "pipeline, penalty"
        snap.contributions = frame(
            f"avg by ({by}) (max_over_time(penwatch_penalty_weighted_value{{{sel}}}[{w}]))",
            "penalty",
            "penalty",
        )
        loss = frame(f"avg(max_over_time(penwatch_loss{{{sel}}}[{w}]))", None, "series")
        total = frame(
            f"sum(avg by (pipeline) (max_over_time(penwatch_pipeline_value{{{sel}}}[{w}])))",
            None,
            "series",
        )
        snap.losses = pd.concat(
            [loss.assign(series="base loss"), total.assign(series="total penalty")],
            ignore_index=True,
        )
        latest = self.instant(f"avg by ({by}) (penwatch_penalty_weighted_value{{{sel}}})")
        if latest:
            tot = sum(abs(v) for _, v in latest if math.isfinite(v))
            snap.shares = pd.DataFrame(
                {
                    "penalty": [m.get("penalty", "") for m, _ in latest],
                    "weighted": [v for _, v in latest],
                    "share": [
                        abs(v) / tot if tot > 0 and math.isfinite(v) else np.nan for _, v in latest
                    ],
                }
            )
        self._grads(snap, sel, w, times, steps, frame)
        self._events(snap, sel, times, steps)
        self._durations(snap, sel, times, steps)
        self._headline(snap, sel, run, choice)
        return snap

    # --- pieces -----------------------------------------------------------------------

    def _step_map(self, expr: str) -> tuple[np.ndarray, np.ndarray]:
        points: dict[float, float] = {}
        for p in self.range(expr).values():
            points.update(p)
        t = np.array(sorted(points))
        return t, np.array([points[x] for x in t])

    def _grads(self, snap: Snapshot, sel: str, w: str, times, steps, frame) -> None:
        by = "pipeline, penalty"
        for wrt in ("params", "input"):
            norms = frame(
                f"avg by ({by}) (max_over_time(penwatch_penalty_grad_norm{{{sel},"
                f'wrt="{wrt}"}}[{w}]))',
                "penalty",
                "term",
            )
            if len(norms):
                break
        if not len(norms):
            return
        snap.grad_wrt = wrt
        parts = [norms.assign(quantity="grad_norm")]
        if wrt == "params":
            for q in ("grad_share", "grad_cosine"):
                parts.append(
                    frame(
                        f"avg by ({by}) (avg_over_time(penwatch_penalty_{q}{{{sel}}}[{w}]))",
                        "penalty",
                        "term",
                    ).assign(quantity=q)
                )
        snap.grads = pd.concat(parts, ignore_index=True)[["step", "term", "quantity", "value"]]
        rows = []
        last = snap.grads.sort_values("step").groupby(["term", "quantity"])["value"].last()
        for term in sorted({t for t, _ in last.index}):
            q = {k: last.get((term, k), np.nan) for k in ("grad_norm", "grad_share", "grad_cosine")}
            status = "ok"
            if term != "base" and q["grad_share"] > _snapshot.DOMINANCE_THRESHOLD:
                status = "dominating"
            elif term != "base" and q["grad_cosine"] < _snapshot.CONFLICT_COSINE:
                status = "conflicting"
            rows.append({"term": term, **q, "status": status})
        snap.terms = pd.DataFrame(rows, columns=list(snap.terms.columns))

    def _events(self, snap: Snapshot, sel: str, times, steps) -> None:
        rows = []
        for expr, kind, label in (
            (
                f"sum by (source, kind, process) (penwatch_nonfinite_total{{{sel}}})",
                "nonfinite",
                "source",
            ),
            (f"sum by (alert, process) (penwatch_alerts_total{{{sel}}})", "alert", "alert"),
        ):
            for key, points in self.range(expr).items():
                labels = dict(key)
                prev = 0.0
                for t, v in sorted(points.items()):
                    if v > prev:
                        step = _at(times, steps, t)
                        rows.append(
                            {
                                "step": step,
                                "wall_time": t,
                                "kind": kind,
                                "name": labels.get(label, kind),
                                "severity": "critical" if kind == "nonfinite" else "warning",
                                "message": f"{labels.get(label, kind)}: +{v - prev:g} "
                                f"({labels.get('kind', 'fired')})",
                                "process": int(labels.get("process", 0) or 0),
                            }
                        )
                    prev = v
        if rows:
            snap.events = pd.DataFrame(rows, columns=list(snap.events.columns)).dropna(
                subset=["step"]
            )

    def _durations(self, snap: Snapshot, sel: str, times, steps) -> None:
        window = f"{max(4 * self.resolution, 60)}s"
        parts = []
        for q in (50, 90, 99):
            expr = (
                f"histogram_quantile({q / 100}, sum by (le) (rate("
                f"penwatch_pipeline_compute_duration_seconds_bucket{{{sel}}}[{window}])))"
            )
            for points in self.range(expr).values():
                for t, v in sorted(points.items()):
                    if math.isfinite(v):
                        parts.append((_at(times, steps, t), f"p{q}", v * 1e3))
            now = self.instant(expr)
            if now and math.isfinite(now[0][1]):
                snap.duration_summary[f"p{q}"] = now[0][1] * 1e3
        if len(snap.duration_summary) == 3:
            snap.duration_summary["steps"] = float(len(times))
        else:
            snap.duration_summary = {}
        snap.durations = pd.DataFrame(parts, columns=["step", "percentile", "ms"]).dropna()

    def _headline(self, snap: Snapshot, sel: str, run: str, choice: RunChoice | None) -> None:
        def one(expr: str) -> float | None:
            r = self.instant(expr)
            return r[0][1] if r and math.isfinite(r[0][1]) else None

        h = snap.headline
        step = one(f"max(penwatch_step{{{sel}}})")
        h.step = None if step is None else int(step)
        h.loss = one(f"avg(penwatch_loss{{{sel}}})")
        h.total = one(f"sum(avg by (pipeline) (penwatch_pipeline_value{{{sel}}}))")
        if h.loss is not None and h.total is not None:
            denom = abs(h.loss) + abs(h.total)
            h.penalty_share = abs(h.total) / denom if denom > 0 else None
        h.nonfinite = int(one(f"sum(penwatch_nonfinite_total{{{sel}}})") or 0)
        h.alerts = int(one(f"sum(penwatch_alerts_total{{{sel}}})") or 0)
        h.open_alerts = int(one(f'count(ALERTS{{alertstate="firing",run="{_esc(run)}"}})') or 0)
        h.updated_at = one(f"max(penwatch_last_step_timestamp_seconds{{{sel}}})")
        h.status = choice.status if choice else "unknown"


def _esc(value: str) -> str:
    """A PromQL string literal body."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _at(times: np.ndarray, steps: np.ndarray, t: float) -> float:
    """The training step at time ``t`` (the last ``penwatch_step`` sample at or before it)."""
    if not times.size:
        return float("nan")
    i = int(np.searchsorted(times, t, side="right")) - 1
    return float(steps[max(i, 0)]) if i >= 0 or t >= times[0] - 1e-9 else float("nan")
