"""Per-bucket min/max/mean downsampling that keeps spikes visible (NumPy).

A long series is cut into buckets of ``width`` consecutive steps (``bucket = step //
width``). Each bucket keeps its finite minimum and maximum, finite sum and count, and how
many values were NaN or Inf — the same aggregates the store's ``rollups`` table holds, so
data read from rollups, from raw rows and from several processes combine the same way.
Drawn as a min/max envelope (:func:`envelope`: two points per bucket), a single-step spike
survives any amount of downsampling, unlike a mean or a stride.

References:
  Jugel, Jerzy, Hackenbroich, Markl, "M4: A Visualization-Oriented Time Series Data
  Aggregation", VLDB 2014.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from penwatch.store._schema import ROLLUP_WIDTHS

BUCKET_DTYPE = np.dtype(
    [
        ("bucket", "i8"),
        ("n", "i8"),
        ("n_nan", "i8"),
        ("n_inf", "i8"),
        ("vmin", "f8"),
        ("vmax", "f8"),
        ("vsum", "f8"),
        ("step_lo", "i8"),
        ("step_hi", "i8"),
    ]
)
"""Fields of one bucket; ``vmin``/``vmax``/``vsum`` are NaN when the bucket has no finite value."""

MAX_BUCKETS = 1000
"""Default most buckets per series a reader asks for."""


def choose_width(span: int, *, max_buckets: int = MAX_BUCKETS) -> int:
    """Bucket width for ``span`` steps: 1 (raw) when it fits, else the smallest rollup width.

    Args:
      span: number of steps covered (``last_step - first_step + 1``).
      max_buckets: most buckets wanted.

    Returns:
      1 or one of :data:`~penwatch.store.ROLLUP_WIDTHS` (the largest if none fits).
    """
    if max_buckets < 1:
        raise ValueError(f"choose_width: max_buckets must be >= 1, got {max_buckets!r}")
    if span <= max_buckets:
        return 1
    for width in ROLLUP_WIDTHS:
        if -(-span // width) <= max_buckets:
            return width
    return ROLLUP_WIDTHS[-1]


def bucketize(steps: np.ndarray, values: np.ndarray, width: int) -> np.ndarray:
    """Aggregate raw ``(step, value)`` pairs into buckets of ``width`` steps.

    Args:
      steps: integer steps, shape ``[n]`` (any order).
      values: float values, shape ``[n]``; NaN and ±Inf are counted, not aggregated.
      width: bucket width in steps, >= 1.

    Returns:
      A :data:`BUCKET_DTYPE` array sorted by bucket.
    """
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if steps.shape != values.shape or steps.ndim != 1:
        raise ValueError(
            f"bucketize: steps and values must be 1-D of one shape, got {steps.shape} "
            f"and {values.shape}"
        )
    if width < 1:
        raise ValueError(f"bucketize: width must be >= 1, got {width!r}")
    if steps.size == 0:
        return np.zeros(0, BUCKET_DTYPE)
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    buckets = steps // width
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    return bucketize_sorted(steps, values, buckets, starts)


def bucketize_sorted(
    steps: np.ndarray, values: np.ndarray, buckets: np.ndarray, starts: np.ndarray
) -> np.ndarray:
    """Aggregate groups of sorted rows that begin at the indices ``starts`` (non-empty)."""
    finite = np.isfinite(values)
    out = np.zeros(starts.size, BUCKET_DTYPE)
    out["bucket"] = buckets[starts]
    out["n"] = np.diff(np.r_[starts, steps.size])
    out["n_nan"] = np.add.reduceat(np.isnan(values), starts)
    out["n_inf"] = np.add.reduceat(np.isinf(values), starts)
    out["vmin"] = np.minimum.reduceat(np.where(finite, values, np.inf), starts)
    out["vmax"] = np.maximum.reduceat(np.where(finite, values, -np.inf), starts)
    out["vsum"] = np.add.reduceat(np.where(finite, values, 0.0), starts)
    none = np.add.reduceat(finite, starts) == 0
    for field in ("vmin", "vmax", "vsum"):
        out[field][none] = np.nan
    out["step_lo"] = np.minimum.reduceat(steps, starts)
    out["step_hi"] = np.maximum.reduceat(steps, starts)
    return out


def combine(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Merge bucket arrays of one width (e.g. one series from several processes)."""
    parts = [p for p in parts if p.size]
    if not parts:
        return np.zeros(0, BUCKET_DTYPE)
    if len(parts) == 1:
        return np.sort(parts[0], order="bucket")
    allb = np.concatenate(parts)
    allb = allb[np.argsort(allb["bucket"], kind="stable")]
    starts = np.flatnonzero(np.r_[True, allb["bucket"][1:] != allb["bucket"][:-1]])
    out = np.zeros(starts.size, BUCKET_DTYPE)
    out["bucket"] = allb["bucket"][starts]
    for field in ("n", "n_nan", "n_inf"):
        out[field] = np.add.reduceat(allb[field], starts)
    out["vmin"] = np.fmin.reduceat(allb["vmin"], starts)
    out["vmax"] = np.fmax.reduceat(allb["vmax"], starts)
    has = np.add.reduceat(~np.isnan(allb["vsum"]), starts) > 0
    out["vsum"] = np.where(has, np.add.reduceat(np.nan_to_num(allb["vsum"]), starts), np.nan)
    out["step_lo"] = np.minimum.reduceat(allb["step_lo"], starts)
    out["step_hi"] = np.maximum.reduceat(allb["step_hi"], starts)
    return out


def mean(b: np.ndarray) -> np.ndarray:
    """Mean of the finite values per bucket (NaN for a bucket without one)."""
    finite = b["n"] - b["n_nan"] - b["n_inf"]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite > 0, b["vsum"] / np.maximum(finite, 1), np.nan)


def envelope(b: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(x, y)`` drawing buckets as a min/max envelope (two points per bucket).

    With ``width == 1`` each bucket is one step and gives one point (its value, or the
    mean when a step was recorded more than once). Otherwise bucket ``k`` gives
    ``(k*width, vmin)`` and ``(k*width + width//2, vmax)``: points line up across series
    of one width, so envelopes can be stacked. A bucket without finite values gives NaN
    (a gap).
    """
    if width == 1:
        return b["bucket"].astype(np.float64), mean(b)
    x = np.empty(2 * b.size)
    y = np.empty(2 * b.size)
    x[0::2] = b["bucket"] * width
    x[1::2] = b["bucket"] * width + width // 2
    y[0::2] = b["vmin"]
    y[1::2] = b["vmax"]
    return x, y
