"""Sinks: where a monitor's records go (Prometheus, OpenTelemetry, SQLite, ...)."""

from penwatch.sinks._base import Sink as Sink
