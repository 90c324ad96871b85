"""Telemetry: the monitor, the records it hands to sinks, and non-finite reports."""

from penwatch.telemetry._record import Event as Event
from penwatch.telemetry._record import LeafReport as LeafReport
from penwatch.telemetry._record import NonFinite as NonFinite
from penwatch.telemetry._record import RunInfo as RunInfo
from penwatch.telemetry._record import StepRecord as StepRecord
