"""Telemetry: the monitor, the records it hands to sinks, and non-finite reports."""

from penwatch.telemetry._instrument import InstrumentedPipeline as InstrumentedPipeline
from penwatch.telemetry._instrument import instrument as instrument
from penwatch.telemetry._monitor import Monitor as Monitor
from penwatch.telemetry._monitor import MonitorStats as MonitorStats
from penwatch.telemetry._nonfinite import describe as describe
from penwatch.telemetry._nonfinite import find_nonfinite as find_nonfinite
from penwatch.telemetry._nonfinite import leaf_nonfinite as leaf_nonfinite
from penwatch.telemetry._nonfinite import leaf_reports as leaf_reports
from penwatch.telemetry._record import Event as Event
from penwatch.telemetry._record import LeafReport as LeafReport
from penwatch.telemetry._record import NonFinite as NonFinite
from penwatch.telemetry._record import RunInfo as RunInfo
from penwatch.telemetry._record import StepRecord as StepRecord

__all__ = [
    "Event",
    "InstrumentedPipeline",
    "LeafReport",
    "Monitor",
    "MonitorStats",
    "NonFinite",
    "RunInfo",
    "StepRecord",
    "describe",
    "find_nonfinite",
    "instrument",
    "leaf_nonfinite",
    "leaf_reports",
]
