"""Numbers that alerts, the dashboard and the Prometheus rules share.

``deploy/prometheus/alerts.yml`` repeats them in PromQL; ``tests/test_deploy_config.py``
checks that the rules use these values.
"""

from __future__ import annotations

__all__ = [
    "CONFLICT_COSINE",
    "CONFLICT_PATIENCE",
    "DOMINANCE_PATIENCE",
    "DOMINANCE_SHARE",
    "HEARTBEAT_SECONDS",
    "SPIKE_MIN_DELTA",
    "SPIKE_WINDOW",
    "SPIKE_ZSCORE",
    "STALE_AFTER_SECONDS",
]

DOMINANCE_SHARE = 0.5
"""A penalty whose gradient share exceeds this dominates the update (SPEC section 4)."""

DOMINANCE_PATIENCE = 20
"""Consecutive diagnostic records above :data:`DOMINANCE_SHARE` before alerting."""

CONFLICT_COSINE = -0.5
"""A term whose gradient cosine to the base loss is below this fights the task."""

CONFLICT_PATIENCE = 20
"""Consecutive diagnostic records below :data:`CONFLICT_COSINE` before alerting."""

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
