"""The dashboard's one data model: figures derived once, the same for every source."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from penwatch.dashboard._model import OPEN_ALERT_STEPS, Snapshot, derive, frame

from penwatch.schema import thresholds

pytestmark = pytest.mark.parallel  # no clocks, processes or servers (make test: -n 2)


def _snap(**latest: float) -> Snapshot:
    snap = Snapshot(run="r", process=None)
    snap.latest = pd.DataFrame(
        [(g, n, v) for key, v in latest.items() for g, n in [key.split("__")]],
        columns=["group", "name", "value"],
    )
    return snap


def _buckets(*rows: tuple[float, float, float, float]) -> pd.DataFrame:
    return pd.DataFrame(
        [(lo, hi, 1.0, bmin, bmax) for lo, hi, bmin, bmax in rows],
        columns=["step", "step_hi", "count", "bad_min", "bad_max"],
    )


def _events(*rows: dict) -> pd.DataFrame:
    out = frame(*Snapshot(run="r", process=None).events.columns)
    return pd.concat([out, pd.DataFrame(list(rows))], ignore_index=True)


def test_signed_shares_with_a_bonus_term():
    # a cost of 0.3 and a bonus of -0.1: shares w_i / Σ|w_j| = 0.75 and -0.25
    snap = _snap(weighted__cost=0.3, weighted__bonus=-0.1)
    snap.headline.loss, snap.headline.total = 1.0, 0.2
    derive(snap)
    shares = snap.shares.set_index("penalty")["share"]
    assert shares["cost"] == pytest.approx(0.75) and shares["bonus"] == pytest.approx(-0.25)
    assert np.abs(shares).sum() == pytest.approx(1.0)
    # total / (|loss| + Σ|w_j|) = 0.2 / 1.4
    assert snap.headline.penalty_share == pytest.approx(0.2 / 1.4)


def test_penalty_share_is_the_usual_one_when_every_term_is_a_cost():
    snap = _snap(weighted__a=0.1, weighted__b=0.3)
    snap.headline.loss, snap.headline.total = 2.0, 0.4
    derive(snap)
    assert snap.headline.penalty_share == pytest.approx(0.4 / 2.4)


def test_bonus_outweighing_costs_gives_a_negative_share():
    snap = _snap(weighted__a=0.1, weighted__bonus=-0.5)
    snap.headline.loss, snap.headline.total = 1.0, -0.4
    derive(snap)
    assert snap.headline.penalty_share == pytest.approx(-0.4 / 1.6)


def test_term_status_from_schema_thresholds_and_base_never_flagged():
    over = thresholds.DOMINANCE_SHARE + 0.1
    under = thresholds.CONFLICT_COSINE - 0.1
    snap = _snap(
        grad_share__base=0.9,
        grad_cosine__base=1.0,
        grad_share__l2=over,
        grad_cosine__l2=0.2,
        grad_share__ortho=0.1,
        grad_cosine__ortho=under,
        grad_share__fine=0.1,
        grad_cosine__fine=0.0,
    )
    derive(snap)
    status = snap.terms.set_index("term")["status"].to_dict()
    assert status == {"base": "ok", "l2": "dominating", "ortho": "conflicting", "fine": "ok"}
    assert [(a.what, a.subject) for a in snap.attention] == [
        ("dominance", "l2"),
        ("conflict", "ortho"),
    ]


def test_nonfinite_steps_and_episodes_exact():
    snap = _snap()
    snap.nonfinite_buckets = _buckets((5, 5, 1, 1), (6, 6, 1, 1), (10, 10, 1, 1))
    derive(snap)
    nf = snap.nonfinite
    assert (nf.steps, nf.steps_max, nf.episodes, nf.first_step, nf.exact) == (3, 3, 2, 5, True)
    assert snap.attention[0].what == "nonfinite"
    assert snap.attention[0].detail == "3 non-finite steps in 2 episodes; the first at step 5."


def test_nonfinite_from_downsampled_buckets_is_a_range():
    snap = _snap()
    # two touching buckets of 8 steps with a bad step somewhere in each, then a full one
    snap.nonfinite_buckets = _buckets((0, 7, 1, 8), (8, 15, 1, 8), (32, 39, 8, 8))
    derive(snap)
    nf = snap.nonfinite
    assert (nf.steps, nf.steps_max, nf.episodes, nf.exact) == (10, 24, 2, False)
    assert "10–24 non-finite steps in at least 2 episodes" in snap.attention[0].detail


def test_nonfinite_episode_events_count_when_buckets_are_coarse():
    snap = _snap()
    snap.nonfinite_buckets = _buckets((0, 511, 1, 512))
    snap.events = _events(
        {"step": 3, "kind": "nonfinite", "name": "NonFinite", "process": 0},
        {"step": 300, "kind": "nonfinite", "name": "NonFinite", "process": 0},
    )
    derive(snap)
    assert snap.nonfinite.episodes == 2 and snap.nonfinite.first_step == 0


def test_open_alerts_recent_or_still_holding():
    snap = _snap(grad_share__l2=0.9, grad_cosine__l2=0.1)
    snap.headline.step = 10_000
    snap.events = _events(
        # long ago but l2 still dominates: open
        {"step": 100, "kind": "alert", "name": "GradientDominance", "penalty": "l2", "process": 0},
        # long ago, its condition cleared: closed
        {"step": 200, "kind": "alert", "name": "GradientConflict", "penalty": "l2", "process": 0},
        # recent: open
        {"step": 10_000 - OPEN_ALERT_STEPS + 1, "kind": "alert", "name": "LossSpike", "process": 0},
    )
    derive(snap)
    assert (snap.headline.alerts, snap.headline.open_alerts) == (3, 2)


def test_tug_of_war_collapse_and_stall_are_named():
    snap = _snap()
    snap.headline.status, snap.headline.updated_at = "running", 1000.0
    snap.events = _events(
        {"step": 50, "kind": "alert", "name": "GradientTugOfWar", "penalty": "l1", "process": 0},
        {"step": 60, "kind": "alert", "name": "GradientTugOfWar", "penalty": "l1", "process": 0},
        {"step": 70, "kind": "alert", "name": "ActivityCollapse", "process": 0},
    )
    derive(snap, stale_after=60.0, now=1000.0 + 45.0)
    assert [(a.what, a.subject) for a in snap.attention] == [
        ("tug_of_war", "l1"),
        ("collapse", ""),
        ("stalled", ""),
    ]
    derive(snap, stale_after=60.0, now=1000.0 + 5.0)
    assert "stalled" not in [a.what for a in snap.attention]
    # the heartbeat is fresh but no step came for 45 s: the training loop stalled
    snap.headline.updated_at, snap.headline.last_step_at = 1040.0, 1000.0
    derive(snap, stale_after=60.0, now=1000.0 + 45.0)
    assert snap.attention[-1].what == "stalled"


def test_sources_import_the_model_never_each_other():
    """One way: sources.py imports both sources; they import _model/_runs/_errors only."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "dashboard"
    allowed = {"_model", "_runs", "_errors", "_text"}
    for name in ("prom_source", "_sqlite_source", "_model"):
        tree = ast.parse((root / f"{name}.py").read_text())
        used = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "penwatch.dashboard"
            ):
                module = node.module.removeprefix("penwatch.dashboard").lstrip(".")
                used |= {module} if module else {a.name for a in node.names}
        assert used <= allowed, (name, used - allowed)
