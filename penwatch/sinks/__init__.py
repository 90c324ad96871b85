"""Sinks: where a monitor's records go (Prometheus, OpenTelemetry, SQLite, ...)."""

from penwatch.sinks._base import Sink as Sink
from penwatch.sinks._base import SinkUnavailable as SinkUnavailable
from penwatch.sinks._callback import Callback as Callback
from penwatch.sinks._logging import Logging as Logging
from penwatch.sinks._mlflow import MLflow as MLflow
from penwatch.sinks._otel import OpenTelemetry as OpenTelemetry
from penwatch.sinks._prometheus import Prometheus as Prometheus
from penwatch.sinks._sqlite import SQLite as SQLite
from penwatch.sinks._tensorboard import TensorBoard as TensorBoard
from penwatch.sinks._wandb import WandB as WandB

__all__ = [
    "Callback",
    "Logging",
    "MLflow",
    "OpenTelemetry",
    "Prometheus",
    "SQLite",
    "Sink",
    "SinkUnavailable",
    "TensorBoard",
    "WandB",
]
