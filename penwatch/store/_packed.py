"""Packed rows of the run store: one BLOB of values per step, decodable in plain SQL.

A step's metric values travel as one big-endian IEEE 754 array in ``steps.vals``, in the
order of its layout (``layout_series.idx``). The array is float32 when every value
survives the round trip through float32 exactly (values computed on the device always
do), float64 otherwise, so the store keeps exactly what was recorded and a 40-metric step
takes 160 bytes instead of 40 rows. The width is told by the length:
``length(vals) = 4 * layouts.size`` means float32.

``metric_rows`` turns the packed rows back into one row per value in plain SQL — no
extension, no registered function — so ``sqlite3 run.db 'SELECT * FROM metric_rows'``
works anywhere: each value's bytes are read as hexadecimal digits, assembled into sign,
exponent and mantissa, and scaled by an exact power of two from the ``pow2`` table. NaN
reads as NULL, ±Inf as ±Inf.

Rollup buckets are packed the same way: one row per ``(layout, width, bucket)`` holding
per-entry arrays (``<f8`` minimum, maximum and sum of the finite values, ``<i4`` counts),
entries being the step-level series (:data:`STEP_KEYS`) followed by the layout's keys.

References:
  IEEE Standard for Floating-Point Arithmetic, IEEE 754-2019, section 3.4 (binary
  interchange formats).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STEP_KEYS: tuple[str, ...] = ("_loss", "_total", "_duration_seconds", "_nonfinite")
"""Step-level series the writer adds to every step (the ``steps`` columns of the same
name), so that readers get loss, total, duration and non-finite counts from rollups too."""

POW2_RANGE = (-1074, 971)
"""Exponents of the ``pow2`` table: every power of two a float64 decode needs."""

_F32, _F64 = np.dtype(">f4"), np.dtype(">f8")


def encode_values(values: np.ndarray) -> list[bytes]:
    """One ``vals`` BLOB per row of ``values`` (``float64[n, k]``): float32 when exact.

    Args:
      values: the steps' values, one row per step, in layout order.

    Returns:
      ``n`` byte strings of ``4 * k`` (float32) or ``8 * k`` (float64) bytes.
    """
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # too large for float32: not exact
        narrow = values.astype(np.float32)
        exact = (narrow == values) | np.isnan(values)
    exact = exact.all(axis=1)
    wide = values.astype(_F64)
    narrow = narrow.astype(_F32)
    return [narrow[i].tobytes() if ok else wide[i].tobytes() for i, ok in enumerate(exact)]


def decode_values(blob: bytes, width: int) -> np.ndarray:
    """The ``float64[width]`` values of one ``vals`` BLOB (see :func:`encode_values`)."""
    dtype = _F32 if len(blob) == 4 * width else _F64
    if len(blob) != dtype.itemsize * width:
        raise ValueError(f"decode_values: a {len(blob)}-byte blob does not hold {width} values")
    return np.frombuffer(blob, dtype=dtype).astype(np.float64)


def encode_counts(counts: np.ndarray) -> bytes | None:
    """``<i4`` bytes of a count array; None when every count is zero (the usual case)."""
    counts = np.asarray(counts)
    return counts.astype("<i4").tobytes() if counts.any() else None


def decode_counts(blob: bytes | None, width: int) -> np.ndarray:
    """The ``int64[width]`` counts of :func:`encode_counts` (zeros for NULL)."""
    if blob is None:
        return np.zeros(width, np.int64)
    return np.frombuffer(blob, dtype="<i4").astype(np.int64)


def encode_floats(values: np.ndarray) -> bytes:
    """``<f8`` bytes of a rollup aggregate array (NaN where a bucket has no finite value)."""
    return np.asarray(values, dtype="<f8").tobytes()


def decode_floats(blob: bytes) -> np.ndarray:
    """The float64 array of :func:`encode_floats`."""
    return np.frombuffer(blob, dtype="<f8").astype(np.float64)


def pow2_rows() -> list[tuple[int, float]]:
    """Rows of the ``pow2`` table: ``(e, 2.0 ** e)`` over :data:`POW2_RANGE`, all exact."""
    lo, hi = POW2_RANGE
    return [(e, float(np.ldexp(1.0, e))) for e in range(lo, hi + 1)]


def _digit(hexed: str, k: int) -> str:
    """SQL for the value (0-15) of hex digit ``k`` (1-based) of the text ``hexed``."""
    return f"(instr('0123456789ABCDEF', substr({hexed}, {k}, 1)) - 1)"


def _bits(hexed: str, first: int, last: int) -> str:
    """SQL for the integer spelled by hex digits ``first..last`` of ``hexed``."""
    return " + ".join(f"({_digit(hexed, k)} << {4 * (last - k)})" for k in range(first, last + 1))


def _pow2(exponent: str) -> str:
    return f"(SELECT v FROM pow2 WHERE e = {exponent})"


def _float_sql(hexed: str, *, wide: bool) -> str:
    """SQL decoding the hex text of one big-endian float (8 or 16 digits) to a REAL."""
    top = _digit(hexed, 1)
    sign = f"(CASE WHEN {top} >= 8 THEN -1 ELSE 1 END)"
    if wide:  # 1 sign bit, 11 exponent bits, 52 mantissa bits
        exp = f"((({top} & 7) << 8) + {_bits(hexed, 2, 3)})"
        mant = f"({_bits(hexed, 4, 16)})"
        top_exp, implicit, sub, bias = 2047, 1 << 52, -1074, 1075
    else:  # 1 sign bit, 8 exponent bits, 23 mantissa bits
        exp = f"((({top} & 7) << 5) + ({_digit(hexed, 2)} << 1) + ({_digit(hexed, 3)} >> 3))"
        mant = f"((({_digit(hexed, 3)} & 7) << 20) + {_bits(hexed, 4, 8)})"
        top_exp, implicit, sub, bias = 255, 1 << 23, -149, 150
    return (
        f"(CASE WHEN {exp} = {top_exp} THEN"
        f" (CASE WHEN {mant} = 0 THEN {sign} * 9e999 END)"
        f" WHEN {exp} = 0 THEN {sign} * {mant} * {_pow2(str(sub))}"
        f" ELSE {sign} * ({implicit} + {mant}) * {_pow2(f'{exp} - {bias}')} END)"
    )


def metric_rows_view() -> str:
    """``CREATE VIEW metric_rows``: one row per stored value, decoded in plain SQL."""
    narrow = _float_sql("p.h", wide=False)
    wide = _float_sql("p.h", wide=True)
    return f"""
CREATE VIEW IF NOT EXISTS metric_rows AS
    SELECT p.id AS id, p.run_id AS run_id, p.step AS step, p.pipeline AS pipeline,
           s.name AS name, s.quantity AS quantity, s.key AS key,
           CASE WHEN p.narrow THEN {narrow} ELSE {wide} END AS value
    FROM (SELECT st.id AS id, st.run_id AS run_id, st.step AS step,
                 st.pipeline AS pipeline, ls.series_id AS series_id,
                 length(st.vals) = 4 * l.size AS narrow,
                 hex(substr(st.vals,
                            (CASE WHEN length(st.vals) = 4 * l.size THEN 4 ELSE 8 END)
                            * ls.idx + 1,
                            CASE WHEN length(st.vals) = 4 * l.size THEN 4 ELSE 8 END)) AS h
          FROM steps AS st
          JOIN layouts AS l ON l.id = st.layout_id
          JOIN layout_series AS ls ON ls.layout_id = st.layout_id) AS p
    JOIN series AS s ON s.id = p.series_id"""


def bucket_sums(
    steps: np.ndarray, entries: np.ndarray, present: np.ndarray, width: int
) -> dict[str, np.ndarray]:
    """Per-bucket aggregates of sorted steps, as arrays: ``bucket``, ``step_lo``,
    ``step_hi`` (one per bucket) and ``n``, ``n_nan``, ``n_inf``, ``vmin``, ``vmax``,
    ``vsum`` (one row per bucket, one column per rollup entry).

    Args:
      steps: ``int64[n]`` steps, ascending.
      entries: ``float64[n, k]`` values (NaN/Inf counted, not aggregated).
      present: ``bool[n, k]``, False where a step has no value for an entry (a step
        column left NULL): not counted at all.
      width: bucket width in steps.
    """
    bucket = steps // width
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    finite = np.isfinite(entries) & present
    with np.errstate(invalid="ignore"):
        agg = {
            "n": np.add.reduceat(present, starts, axis=0),
            "n_nan": np.add.reduceat(np.isnan(entries) & present, starts, axis=0),
            "n_inf": np.add.reduceat(np.isinf(entries) & present, starts, axis=0),
            "vmin": np.minimum.reduceat(np.where(finite, entries, np.inf), starts, axis=0),
            "vmax": np.maximum.reduceat(np.where(finite, entries, -np.inf), starts, axis=0),
            "vsum": np.add.reduceat(np.where(finite, entries, 0.0), starts, axis=0),
        }
    none = np.add.reduceat(finite, starts, axis=0) == 0
    for field in ("vmin", "vmax", "vsum"):
        agg[field][none] = np.nan
    agg["bucket"] = bucket[starts]
    agg["step_lo"] = steps[starts]
    agg["step_hi"] = steps[np.r_[starts[1:], steps.size] - 1]
    return agg


def coarsen(agg: dict[str, np.ndarray], factor: int) -> dict[str, np.ndarray]:
    """The aggregates of buckets ``factor`` times wider, combined from ``agg`` (sorted
    buckets of :func:`bucket_sums`): the same numbers, up to the order of the sums.

    The store's widths are multiples of each other, so a batch is aggregated once at the
    finest width and each coarser width from the one below: NumPy releases the GIL in
    loops over more than a few hundred elements, a hand-off on a telemetry thread, and the
    coarser inputs are small.
    """
    bucket = agg["bucket"] // factor
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    out = {
        "bucket": bucket[starts],
        "step_lo": np.minimum.reduceat(agg["step_lo"], starts),
        "step_hi": np.maximum.reduceat(agg["step_hi"], starts),
        "n": np.add.reduceat(agg["n"], starts, axis=0),
        "n_nan": np.add.reduceat(agg["n_nan"], starts, axis=0),
        "n_inf": np.add.reduceat(agg["n_inf"], starts, axis=0),
        "vmin": np.fmin.reduceat(agg["vmin"], starts, axis=0),  # fmin/fmax skip NaN:
        "vmax": np.fmax.reduceat(agg["vmax"], starts, axis=0),  # a bucket with no finite
        "vsum": np.add.reduceat(zero_nan(agg["vsum"]), starts, axis=0),
    }
    none = out["n"] - out["n_nan"] - out["n_inf"] == 0  # value holds NaN there
    out["vsum"][none] = np.nan
    return out


def zero_nan(values: np.ndarray) -> np.ndarray:
    """``values`` with NaN as 0 (a sum over no finite value adds nothing).

    Two ufunc calls: ``np.nan_to_num`` costs ≈ 14 µs a call on the small arrays of a
    batch (its Python-level dtype handling), a dozen calls per batch at every width.
    """
    return np.where(np.isnan(values), 0.0, values)


def split_buckets(agg: dict[str, np.ndarray]) -> list[tuple[int, dict[str, np.ndarray]]]:
    """``[(bucket, {n, n_nan, n_inf, vmin, vmax, vsum, step_lo, step_hi})]`` of
    :func:`bucket_sums` arrays, one entry per bucket (what :func:`merge_bucket` and
    :func:`encode_bucket` take)."""
    fields = ("n", "n_nan", "n_inf", "vmin", "vmax", "vsum")
    return [
        (
            int(b),
            {
                **{f: agg[f][i] for f in fields},
                "step_lo": agg["step_lo"][i],
                "step_hi": agg["step_hi"][i],
            },
        )
        for i, b in enumerate(agg["bucket"])
    ]


def merge_bucket(old: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Two aggregates of one bucket combined (the stored row and a new batch's part)."""
    return {
        "n": old["n"] + new["n"],
        "n_nan": old["n_nan"] + new["n_nan"],
        "n_inf": old["n_inf"] + new["n_inf"],
        "vmin": np.fmin(old["vmin"], new["vmin"]),
        "vmax": np.fmax(old["vmax"], new["vmax"]),
        "vsum": np.where(
            np.isnan(old["vsum"]) & np.isnan(new["vsum"]),
            np.nan,
            zero_nan(old["vsum"]) + zero_nan(new["vsum"]),
        ),
        "step_lo": min(old["step_lo"], new["step_lo"]),
        "step_hi": max(old["step_hi"], new["step_hi"]),
    }


def encode_bucket(agg: dict[str, np.ndarray]) -> tuple[object, ...]:
    """``rollups`` columns ``step_lo`` to ``vsum`` of one bucket's aggregates."""
    return (
        int(agg["step_lo"]),
        int(agg["step_hi"]),
        np.asarray(agg["n"]).astype("<i4").tobytes(),
        encode_counts(agg["n_nan"]),
        encode_counts(agg["n_inf"]),
        encode_floats(agg["vmin"]),
        encode_floats(agg["vmax"]),
        encode_floats(agg["vsum"]),
    )


def decode_bucket(row: Sequence[object]) -> dict[str, np.ndarray]:
    """The aggregates of a ``rollups`` row read as ``step_lo, step_hi, n, n_nan, n_inf,
    vmin, vmax, vsum``."""
    step_lo, step_hi, n, n_nan, n_inf, vmin, vmax, vsum = row
    counts = decode_counts(n, 0)  # type: ignore[arg-type]
    size = counts.size
    return {
        "n": counts,
        "n_nan": decode_counts(n_nan, size),  # type: ignore[arg-type]
        "n_inf": decode_counts(n_inf, size),  # type: ignore[arg-type]
        "vmin": decode_floats(vmin),  # type: ignore[arg-type]
        "vmax": decode_floats(vmax),  # type: ignore[arg-type]
        "vsum": decode_floats(vsum),  # type: ignore[arg-type]
        "step_lo": int(step_lo),  # type: ignore[call-overload]
        "step_hi": int(step_hi),  # type: ignore[call-overload]
    }


def decode_rows(blobs: Sequence[bytes], width: int) -> np.ndarray:
    """``float64[n, width]`` values of ``n`` ``vals`` BLOBs of one layout (mixed widths)."""
    out = np.empty((len(blobs), width), dtype=np.float64)
    narrow = np.array([len(b) == 4 * width for b in blobs], dtype=bool)
    for mask, dtype in ((narrow, _F32), (~narrow, _F64)):
        if mask.any():
            joined = b"".join(b for b, m in zip(blobs, mask, strict=True) if m)
            out[mask] = np.frombuffer(joined, dtype=dtype).reshape(-1, width)
    return out
