"""Telemetry: the monitor that turns a step's metrics into records for the sinks."""

from penwatch.telemetry._instrument import InstrumentedPipeline as InstrumentedPipeline
from penwatch.telemetry._instrument import instrument as instrument
from penwatch.telemetry._monitor import Monitor as Monitor
from penwatch.telemetry._nonfinite import leaf_nonfinite as leaf_nonfinite
from penwatch.telemetry._stats import MonitorStats as MonitorStats
from penwatch.telemetry._stats import SinkStats as SinkStats

__all__ = [
    "InstrumentedPipeline",
    "Monitor",
    "MonitorStats",
    "SinkStats",
    "instrument",
    "leaf_nonfinite",
]
