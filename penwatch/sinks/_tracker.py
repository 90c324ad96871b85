"""What the tracker bridges (TensorBoard, MLflow) share: how a run's configuration and
an event read there."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from penwatch.schema import Event, RunInfo

__all__ = ["event_text", "hparam_values"]


def _flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"opt": {"lr": 0.1}}`` -> ``{"opt.lr": 0.1}``; leaves kept as they are."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def hparam_values(info: RunInfo) -> dict[str, str | float | bool]:
    """The run's configuration (flattened, ``.``-joined keys) and identity as hyperparameters:
    numbers and booleans as they are, anything else as its ``str``."""
    values: dict[str, Any] = {
        "penwatch.run": info.run,
        "penwatch.process": info.process,
        "penwatch.version": info.version,
        "penwatch.backend": info.backend,
        "penwatch.devices": info.devices,
    }
    for key, value in _flat_config(info.config).items():
        ok = isinstance(value, bool) or (
            isinstance(value, int | float) and math.isfinite(float(value))
        )
        values[key] = value if ok else str(value)
    return values


def event_text(event: Event) -> str:
    """How an event reads in a tracker: ``step 10 [warning] NonFinite: message``."""
    return f"step {event.step} [{event.severity}] {event.name}: {event.message}"
