"""The record: one definition of what a step is, read by every layer (SPEC section 10).

The ground floor of penwatch: the metric-key grammar and the layout of a step's keys,
the typed :class:`StepRecord`, :class:`Event` and :class:`RunInfo`, non-finite reports,
and the thresholds alerts, the dashboard and the Prometheus rules share. It imports no
other penwatch layer.
"""

from penwatch.schema import _thresholds as thresholds
from penwatch.schema._keys import BASE_TERM as BASE_TERM
from penwatch.schema._keys import CAPTURE_QUANTITIES as CAPTURE_QUANTITIES
from penwatch.schema._keys import GRAM as GRAM
from penwatch.schema._keys import LEAF_COUNTS as LEAF_COUNTS
from penwatch.schema._keys import PENALTY_QUANTITIES as PENALTY_QUANTITIES
from penwatch.schema._keys import RUN_KEYS as RUN_KEYS
from penwatch.schema._keys import TERM_QUANTITIES as TERM_QUANTITIES
from penwatch.schema._keys import Layout as Layout
from penwatch.schema._keys import Slot as Slot
from penwatch.schema._keys import capture_key as capture_key
from penwatch.schema._keys import gram_key as gram_key
from penwatch.schema._keys import group_key as group_key
from penwatch.schema._keys import is_reserved as is_reserved
from penwatch.schema._keys import layout_of as layout_of
from penwatch.schema._keys import penalty_key as penalty_key
from penwatch.schema._keys import term_key as term_key
from penwatch.schema._leaves import LeafCounts as LeafCounts
from penwatch.schema._leaves import TreeLeafCounts as TreeLeafCounts
from penwatch.schema._metrics import Metrics as Metrics
from penwatch.schema._nonfinite import describe as describe
from penwatch.schema._nonfinite import find_nonfinite as find_nonfinite
from penwatch.schema._nonfinite import leaf_reports as leaf_reports
from penwatch.schema._record import RUN_STATUSES as RUN_STATUSES
from penwatch.schema._record import Event as Event
from penwatch.schema._record import EventKind as EventKind
from penwatch.schema._record import LeafReport as LeafReport
from penwatch.schema._record import NonFinite as NonFinite
from penwatch.schema._record import PenaltyValues as PenaltyValues
from penwatch.schema._record import RecordKind as RecordKind
from penwatch.schema._record import RunInfo as RunInfo
from penwatch.schema._record import RunStatus as RunStatus
from penwatch.schema._record import Severity as Severity
from penwatch.schema._record import StepRecord as StepRecord
from penwatch.schema._record import TermValues as TermValues

__all__ = [
    "BASE_TERM",
    "CAPTURE_QUANTITIES",
    "GRAM",
    "LEAF_COUNTS",
    "PENALTY_QUANTITIES",
    "RUN_KEYS",
    "RUN_STATUSES",
    "TERM_QUANTITIES",
    "Event",
    "EventKind",
    "Layout",
    "LeafCounts",
    "LeafReport",
    "Metrics",
    "NonFinite",
    "PenaltyValues",
    "RecordKind",
    "RunInfo",
    "RunStatus",
    "Severity",
    "Slot",
    "StepRecord",
    "TermValues",
    "TreeLeafCounts",
    "capture_key",
    "describe",
    "find_nonfinite",
    "gram_key",
    "group_key",
    "is_reserved",
    "layout_of",
    "leaf_reports",
    "penalty_key",
    "term_key",
    "thresholds",
]
