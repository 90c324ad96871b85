"""Packed store rows (schema version 2): exact values, the plain-SQL ``metric_rows``
view, rollups across layouts, and the SPEC section 9 size bar (<= 0.5 KB per step at 40
metrics)."""

from __future__ import annotations

import itertools
import json
import math
import sqlite3
import struct
import time

import numpy as np
import pytest

from penwatch import store
from penwatch.schema import NonFinite, RunInfo, StepRecord
from penwatch.store import _packed
from penwatch.store._rows import StepColumns
from penwatch.store._synthetic import synthetic_run

EDGE = [
    0.0,
    1.0,
    -2.5,
    0.1,  # not a float32: the row is stored as float64
    1e-45,  # float32 subnormal
    5e-324,  # float64 subnormal
    -3.4e38,
    1.7976931348623157e308,
    math.inf,
    -math.inf,
    math.nan,
    123456789.123,
]


def _record(step: int, values: dict[str, float], run: str = "r") -> StepRecord:
    return StepRecord(run, 0, step, "default", time.time(), values)


def _write(path, records) -> None:
    w = store.StoreWriter(path)
    w.open_run(RunInfo("r", 0, "1", "cpu", 1, time.time()))
    for r in records:
        w.add_step(r)
    w.finish_run("r")
    w.close()


def _same(a, b) -> bool:
    return (a is None and math.isnan(b)) or a == b or (math.isnan(a) and math.isnan(b))


def test_values_round_trip_exactly_float32_when_exact_float64_otherwise(tmp_path):
    narrow = np.array([[0.5, -1.25, np.inf, np.nan, np.float32(0.1)]])
    wide = np.array([[0.5, 0.1, 1e300, -np.inf, np.nan]])
    (nb,), (wb,) = _packed.encode_values(narrow), _packed.encode_values(wide)
    assert len(nb) == 4 * 5 and len(wb) == 8 * 5
    np.testing.assert_array_equal(_packed.decode_values(nb, 5), narrow[0])
    np.testing.assert_array_equal(_packed.decode_values(wb, 5), wide[0])
    with pytest.raises(ValueError, match="does not hold 3 values"):
        _packed.decode_values(nb, 3)


def test_metric_rows_view_decodes_every_value_in_plain_sql(tmp_path):
    """The view needs no penwatch code: a bare sqlite3 connection reads exact values."""
    path = tmp_path / "s.db"
    rng = np.random.default_rng(0)
    records = [_record(0, {f"m{i}": v for i, v in enumerate(EDGE)})]
    bits = rng.integers(0, 2**32, size=400, dtype=np.uint64).astype(np.uint32)
    f32 = [struct.unpack(">f", struct.pack(">I", int(b)))[0] for b in bits]
    records.append(_record(1, {f"m{i}": v for i, v in enumerate(f32)}))
    bits = rng.integers(0, 2**63, size=400, dtype=np.uint64) * 2 + rng.integers(0, 2, 400)
    f64 = [struct.unpack(">d", struct.pack(">Q", int(b)))[0] for b in bits.astype(np.uint64)]
    records.append(_record(2, {f"m{i}": v for i, v in enumerate(f64)}))
    _write(path, records)
    conn = sqlite3.connect(path)  # no functions registered: what any SQLite tool sees
    for record in records:
        got = dict(
            conn.execute(
                "SELECT key, value FROM metric_rows WHERE step = ? ORDER BY id", (record.step,)
            ).fetchall()
        )
        assert got.keys() == record.values.keys()
        for key, value in record.values.items():
            assert _same(got[key], value), (record.step, key, got[key], value)
    names = conn.execute("SELECT DISTINCT name, quantity FROM metric_rows").fetchall()
    assert (None, "m0") in names


def test_reader_values_records_and_rollups_across_layouts(tmp_path):
    """Diagnostics steps have more keys (another layout): series read whole anyway."""
    path = tmp_path / "s.db"
    records = []
    for r in synthetic_run("r", 300, nan_at=(40,), penalties=("l1", "l2"), diagnostics=False):
        if r.step % 5 == 0:  # a diagnostics step: same keys plus term figures
            values = {**r.values, "base_grad_share": 0.5, "l1_grad_share": 0.5}
            r = StepRecord(r.run, 0, r.step, r.pipeline, r.wall_time, values, loss=r.loss)
        records.append(r)
    _write(path, records)
    reader = store.StoreReader(path)
    assert reader.records("r") == [
        (r.step, r.pipeline, pytest.approx(dict(r.values), nan_ok=True)) for r in records
    ]
    run_id = reader.runs()[0].id
    series = {s.key: s.id for s in reader.series([run_id])}
    values = reader.values([run_id])
    loss = values["value"][values["series_id"] == series["loss"]]
    np.testing.assert_array_equal(loss, [r.values["loss"] for r in records])
    share = values["step"][values["series_id"] == series["l1_grad_share"]]
    assert share.tolist() == list(range(0, 300, 5))
    later = reader.values([run_id], since_id=int(values["id"].max()) - 1)
    assert set(later["step"].tolist()) == {299}
    for key in ("loss", "l1_grad_share", "_loss"):
        raw = [(r.step, r.values.get(key, r.loss if key == "_loss" else None)) for r in records]
        raw = [(s, v) for s, v in raw if v is not None]
        want = store.bucketize(*map(np.array, zip(*raw, strict=True)), 16)
        got = reader.rollup(series[key], width=16)
        for field in ("bucket", "n", "n_nan", "n_inf", "step_lo", "step_hi"):
            np.testing.assert_array_equal(got[field], want[field], err_msg=(key, field))
        for field in ("vmin", "vmax", "vsum"):
            np.testing.assert_allclose(got[field], want[field], rtol=1e-12, err_msg=key)
        tail = reader.rollup(series[key], width=16, since_bucket=10)
        assert tail["bucket"].min() == 10


def test_older_store_version_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "s.db"
    _write(path, [_record(0, {"a": 1.0})])
    sqlite3.connect(path, isolation_level=None).execute(
        "UPDATE meta SET value = '1' WHERE key = 'schema_version'"
    )
    with pytest.raises(store.StoreError, match=r"version 1.*new store file"):
        store.StoreReader(path).runs()


def test_store_takes_at_most_half_a_kilobyte_per_step_at_40_metrics(tmp_path):
    """SPEC section 9: <= 0.5 KB per recorded step for 40 metrics (file size / steps)."""
    path = tmp_path / "s.db"
    penalties = ("l1", "l2", "elastic_net", "entropy", "orthogonality", "kl", "js")
    steps = 20_000
    records = (  # 7 penalties x 5 quantities + 4 run-level keys + a learning rate, as
        # float32 like every value computed on a device
        StepRecord(
            r.run,
            0,
            r.step,
            r.pipeline,
            r.wall_time,
            {k: float(np.float32(v)) for k, v in {**r.values, "lr": 1e-3}.items()},
            loss=r.loss,
            duration_seconds=r.duration_seconds,
        )
        for r in synthetic_run("r", steps, penalties=penalties, diagnostics=False)
    )
    first = next(records)
    assert len(first.values) == 40, len(first.values)
    w = store.StoreWriter(path, batch_size=256)
    w.open_run(RunInfo("r", 0, "1", "cpu", 1, time.time()))
    w.add_step(first)
    for r in records:
        w.add_step(r)
    w.finish_run("r")
    w.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    per_step = path.stat().st_size / steps
    print(f"store: {per_step:.0f} bytes per step at 40 metrics")
    assert per_step <= 512, per_step


def test_coarser_rollups_combined_from_finer_equal_direct_aggregation():
    """The writer aggregates a batch at the finest width and combines each coarser width
    from the one below; that equals aggregating the steps directly (sums up to order)."""
    from penwatch.store._schema import ROLLUP_WIDTHS

    assert all(b % a == 0 for a, b in itertools.pairwise(ROLLUP_WIDTHS))
    rng = np.random.default_rng(0)
    steps = np.sort(rng.choice(5000, size=700, replace=False)).astype(np.int64)
    entries = rng.normal(size=(700, 5)) * 1e3
    entries[rng.random(entries.shape) < 0.05] = np.nan
    entries[rng.random(entries.shape) < 0.03] = np.inf
    entries[100:400, 2] = np.nan  # a stretch with no finite value in one entry
    present = rng.random(entries.shape) > 0.1
    agg = _packed.bucket_sums(steps, entries, present, 16)
    for fine, coarse in zip((16, 128, 1024), (128, 1024, 8192), strict=True):
        agg = _packed.coarsen(agg, coarse // fine)
        want = _packed.bucket_sums(steps, entries, present, coarse)
        assert set(agg) == set(want)
        for field in ("bucket", "step_lo", "step_hi", "n", "n_nan", "n_inf", "vmin", "vmax"):
            np.testing.assert_array_equal(agg[field], want[field], err_msg=(coarse, field))
        np.testing.assert_allclose(agg["vsum"], want["vsum"], rtol=1e-12, err_msg=coarse)
        if coarse == 128:
            assert np.isnan(agg["vsum"][:, 2]).any()  # the empty stretch stays NaN, not 0


def test_step_columns_tell_a_missing_step_value_from_a_recorded_nan():
    """The step-level rollup entries count a recorded NaN as NaN and a missing value not
    at all; a loss comes from ``loss``, else ``base_loss``, else the ``loss`` metric."""
    records = [
        StepRecord("r", 0, 0, "default", 1.0, {"l1": 1.0}, loss=None, duration_seconds=None),
        StepRecord("r", 0, 1, "default", 2.0, {"l1": 1.0, "total": math.nan}, loss=math.nan),
        StepRecord(
            "r",
            0,
            2,
            "p",
            3.0,
            {"base_loss": 0.5, "loss": 9.0, "total": 2.0},
            duration_seconds=0.25,
            trace_id=0xAB,
            nonfinite=(NonFinite("l1", "nan", "pipeline"),),
        ),
    ]
    columns = StepColumns.of(records)
    values, present = columns.step_series()
    np.testing.assert_array_equal(
        present, [[False, False, False, True], [True, True, False, True], [True] * 4]
    )
    assert np.isnan(values[1, 0]) and np.isnan(values[1, 1])
    np.testing.assert_array_equal(values[2], [0.5, 2.0, 0.25, 1.0])
    rows = columns.rows([7, 7, 7], [3, 3, 4], [b"a", b"b", b"c"])
    assert rows[2][:9] == (7, 2, "p", 3.0, 0.5, 2.0, 0.25, 1, f"{0xAB:032x}")
    assert json.loads(rows[2][9])["nonfinite"][0]["key"] == "l1" and rows[0][9] is None
    assert rows[2][10:] == (4, b"c")
    taken = columns.take([0, 2])
    assert taken.step == [0, 2] and taken.pipeline == ["default", "p"]
    assert columns.take([0, 1, 2]) is columns
