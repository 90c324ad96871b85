"""Numbers that alerts, the dashboard and the Prometheus rules share.

``deploy/prometheus/alerts.yml`` repeats them in PromQL; ``tests/test_deploy_config.py``
checks that the rules use these values.
"""

from __future__ import annotations

__all__ = [
    "COLLAPSE_DEAD_FRACTION",
    "COLLAPSE_PATIENCE",
    "CONFLICT_COSINE",
    "CONFLICT_PATIENCE",
    "DOMINANCE_PATIENCE",
    "DOMINANCE_SHARE",
    "HEARTBEAT_SECONDS",
    "LINT_SHARE",
    "SPIKE_MIN_DELTA",
    "SPIKE_WINDOW",
    "SPIKE_ZSCORE",
    "STALE_AFTER_SECONDS",
    "SUGGEST_BASE_MIN_SHARE",
    "SUGGEST_PENALTY_MAX_SHARE",
    "TUG_COSINE",
    "TUG_PATIENCE",
    "TUG_RATIO",
]

DOMINANCE_SHARE = 0.5
"""A penalty whose gradient share exceeds this dominates the update (SPEC section 4)."""

DOMINANCE_PATIENCE = 20
"""Consecutive diagnostic records above :data:`DOMINANCE_SHARE` before alerting."""

CONFLICT_COSINE = -0.5
"""A term whose gradient cosine to the base loss is below this fights the task."""

CONFLICT_PATIENCE = 20
"""Consecutive diagnostic records below :data:`CONFLICT_COSINE` before alerting."""

TUG_RATIO = 0.5
"""Tug of war: a penalty's gradient norm is at least this fraction of the task's (SPEC §12)."""

TUG_COSINE = -0.5
"""Tug of war: ... and its gradient cosine to the task gradient is below this."""

TUG_PATIENCE = 5
"""Consecutive diagnostic records in tug of war before alerting."""

COLLAPSE_DEAD_FRACTION = 0.5
"""A captured activation with more than this fraction of dead units has collapsed."""

COLLAPSE_PATIENCE = 1
"""Consecutive records above :data:`COLLAPSE_DEAD_FRACTION` before alerting."""

LINT_SHARE = 0.9
"""First-step lint: a penalty with a gradient share above this at the first diagnostics
step is reported at once."""

SUGGEST_PENALTY_MAX_SHARE = 0.3
"""``suggest_weights``' default band: each penalty's gradient share at most this..."""

SUGGEST_BASE_MIN_SHARE = 0.5
"""... and the base (task) term's share at least this."""

SPIKE_ZSCORE = 6.0
"""Robust z-score above which a loss (or metric) value is a spike."""

SPIKE_MIN_DELTA = 0.05
"""Absolute floor of a spike: a rise above the window's median smaller than this never
fires, whatever its z-score (a converged 0.005 loss moving to 0.02 is not a spike)."""

SPIKE_WINDOW = 128
"""Recent values the spike z-score is computed over."""

HEARTBEAT_SECONDS = 5.0
"""How often a running monitor refreshes its run's ``updated_at`` in the store."""

STALE_AFTER_SECONDS = 60.0
"""A ``running`` run with no heartbeat for this long reads as ``crashed``."""
