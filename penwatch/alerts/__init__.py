"""Alerts: rules the monitor evaluates on every record, each firing once per episode.

Every alert reaches every sink (``penwatch_alerts_total``, an OpenTelemetry span event,
the SQLite ``events`` table, a log line) and has a Prometheus alerting-rule twin in
``deploy/prometheus/alerts.yml``.
"""

from penwatch.alerts._balance import ActivityCollapse as ActivityCollapse
from penwatch.alerts._balance import FirstStepLint as FirstStepLint
from penwatch.alerts._balance import GradientTugOfWar as GradientTugOfWar
from penwatch.alerts._base import Alert as Alert
from penwatch.alerts._base import Episodes as Episodes
from penwatch.alerts._gradient import GradientConflict as GradientConflict
from penwatch.alerts._gradient import GradientDominance as GradientDominance
from penwatch.alerts._nonfinite import NonFinite as NonFinite
from penwatch.alerts._nonfinite import NonFiniteDetected as NonFiniteDetected
from penwatch.alerts._spike import LossSpike as LossSpike
from penwatch.alerts._spike import robust_zscore as robust_zscore

__all__ = [
    "ActivityCollapse",
    "Alert",
    "Episodes",
    "FirstStepLint",
    "GradientConflict",
    "GradientDominance",
    "GradientTugOfWar",
    "LossSpike",
    "NonFinite",
    "NonFiniteDetected",
    "robust_zscore",
]
