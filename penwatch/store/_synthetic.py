"""Synthetic but realistic step records, for tests, benchmarks and dashboard previews.

The records look like what a monitor hands to sinks for a training step with a pipeline
of penalties and gradient diagnostics: a decaying base loss, penalties whose weighted
contributions drift, an ``l2`` term whose gradient share grows until it dominates, an
``orthogonality`` term whose gradient fights the task (negative cosine), optional
NaN/Inf injections and loss spikes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import numpy as np

from penwatch.schema import StepRecord, find_nonfinite, layout_of

DEFAULT_PENALTIES: tuple[str, ...] = ("l1", "l2", "entropy", "orthogonality")


def synthetic_values(
    step: int,
    *,
    penalties: Sequence[str] = DEFAULT_PENALTIES,
    diagnostics: bool = True,
    nan: bool = False,
    spike: bool = False,
) -> dict[str, float]:
    """Flat metrics (SPEC section 3/4 keys) of one synthetic step."""
    t = step / 1000.0
    loss = 2.0 * math.exp(-t) + 0.1 + 0.02 * math.sin(step / 7.0)
    if spike:
        loss *= 25.0
    values: dict[str, float] = {}
    total = 0.0
    for i, name in enumerate(penalties):
        weight = 10.0 ** -(i + 1) * (1.0 + 0.5 * math.sin(t + i))
        raw = (1.0 + i) * (1.0 + 0.3 * math.cos(step / (11.0 + i))) * (1.0 + t / (1 + i))
        values[name] = raw
        values[f"{name}_weighted"] = weight * raw
        values[f"{name}_weight"] = weight
        values[f"{name}_finite"] = 1.0
        values[f"{name}_grad_norm"] = raw * (0.5 + i) * 10.0 ** (-i)
        total += weight * raw
    values["total"] = total
    values["total_grad_norm"] = 0.3 * total + 1e-3
    values["loss"] = loss + total
    values["base_loss"] = loss
    if diagnostics:
        grow = min(1.0, step / 2000.0)
        shares = {"base": 1.0 - 0.7 * grow}
        rest = 0.7 * grow
        for name in penalties:
            shares[name] = rest * (0.9 if name == "l2" else 0.1 / max(1, len(penalties) - 1))
        for term, share in shares.items():
            cosine = 1.0 if term == "base" else (-0.8 if term == "orthogonality" else 0.3)
            values[f"{term}_param_grad_norm"] = abs(share) * 5.0 + 1e-4
            values[f"{term}_grad_share"] = share
            values[f"{term}_grad_cosine"] = cosine
    if nan and penalties:
        first = penalties[-1]
        values[first] = math.nan
        values[f"{first}_weighted"] = math.nan
        values[f"{first}_finite"] = 0.0
        values["total"] = math.nan
        values["loss"] = math.inf
    # rounded to float32, as a device computes them (the store keeps such rows at 4 bytes
    # per value)
    return dict(zip(values, np.array(list(values.values()), np.float32).tolist(), strict=True))


def synthetic_record(
    run: str,
    step: int,
    *,
    process: int = 0,
    pipeline: str = "default",
    wall_time: float | None = None,
    penalties: Sequence[str] = DEFAULT_PENALTIES,
    diagnostics: bool = True,
    nan: bool = False,
    spike: bool = False,
) -> StepRecord:
    """One :class:`~penwatch.schema.StepRecord` as the monitor would build it."""
    values = synthetic_values(
        step, penalties=penalties, diagnostics=diagnostics, nan=nan, spike=spike
    )
    layout = layout_of(values, penalties)
    numbers = tuple(values.values())
    return StepRecord(
        run=run,
        process=process,
        step=step,
        pipeline=pipeline,
        wall_time=time.time() if wall_time is None else wall_time,
        values=values,
        layout=layout,
        loss=values["base_loss"],
        duration_seconds=0.004 + 0.002 * math.sin(step / 5.0) ** 2 + (0.05 if spike else 0.0),
        nonfinite=find_nonfinite(numbers, layout),
    )


def synthetic_run(
    run: str,
    steps: int,
    *,
    process: int = 0,
    start: int = 0,
    nan_at: Sequence[int] = (),
    spike_at: Sequence[int] = (),
    **kwargs: object,
) -> Iterator[StepRecord]:
    """``steps`` consecutive synthetic records starting at step ``start``."""
    t0 = time.time() - steps * 0.01
    for step in range(start, start + steps):
        yield synthetic_record(
            run,
            step,
            process=process,
            wall_time=t0 + 0.01 * (step - start),
            nan=step in nan_at,
            spike=step in spike_at,
            **kwargs,  # type: ignore[arg-type]
        )
