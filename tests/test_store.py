"""The SQLite run store: schema, writer/reader round trip, rollups, downsampling."""

from __future__ import annotations

import math
import sqlite3
import time

import numpy as np
import pytest

from penwatch import store
from penwatch.schema import Event, RunInfo, thresholds
from penwatch.store._synthetic import synthetic_record, synthetic_run


def _info(run: str = "r", process: int = 0) -> RunInfo:
    return RunInfo(run, process, "1.0", "cpu", 1, time.time(), config={"lr": 0.1})


def _write(path, records, events=(), **kwargs) -> store.StoreWriter:
    w = store.StoreWriter(path, **kwargs)
    runs = {(r.run, r.process) for r in records}
    for run, process in sorted(runs):
        w.open_run(_info(run, process))
    for r in records:
        w.add_step(r)
    for e in events:
        w.add_event(e)
    for run, process in runs:
        w.finish_run(run, process)
    w.close()
    return w


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_schema_created_with_version_and_wal(tmp_path):
    path = tmp_path / "sub" / "s.db"
    _write(path, [synthetic_record("r", 0)])
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"runs", "steps", "series", "layouts", "rollups", "events", "metric_rows"} <= tables


def test_newer_or_foreign_database_is_refused(tmp_path):
    path = tmp_path / "s.db"
    _write(path, [synthetic_record("r", 0)])
    sqlite3.connect(path, isolation_level=None).execute(
        "UPDATE meta SET value = '99' WHERE key = 'schema_version'"
    )
    with pytest.raises(store.StoreError, match="newer"):
        store.StoreReader(path).runs()
    other = tmp_path / "other.db"
    sqlite3.connect(other, isolation_level=None).execute("CREATE TABLE t (x)")
    with pytest.raises(store.StoreError, match="not a penwatch store"):
        store.StoreReader(other).runs()


def test_missing_file_raises_and_empty_file_reads_empty(tmp_path):
    with pytest.raises(FileNotFoundError):
        store.StoreReader(tmp_path / "nope.db")
    (tmp_path / "empty.db").touch()
    assert store.StoreReader(tmp_path / "empty.db").runs() == []


def test_round_trip_values_nan_inf_events_and_runs(tmp_path):
    path = tmp_path / "s.db"
    records = list(synthetic_run("r", 30, nan_at=(7,)))
    event = Event(
        "r",
        0,
        7,
        time.time(),
        "nonfinite",
        "NonFinite",
        "went NaN",
        severity="critical",
        attributes={"metrics": ["total"], "x": math.inf},
    )
    _write(path, records, [event])
    reader = store.StoreReader(path)
    stored = reader.records("r")
    assert len(stored) == len(records)
    for (step, pipeline, values), rec in zip(stored, records, strict=True):
        assert (step, pipeline) == (rec.step, rec.pipeline)
        assert values.keys() == rec.values.keys()
        assert all(_same(values[k], rec.values[k]) for k in values)
    assert math.isinf(stored[7][2]["loss"]) and math.isnan(stored[7][2]["total"])
    (run,) = reader.runs()
    assert (run.name, run.status, run.last_step, run.config) == ("r", "finished", 29, {"lr": 0.1})
    (ev,) = reader.events([run.id])
    assert (ev.kind, ev.name, ev.step, ev.attributes["metrics"]) == (
        "nonfinite",
        "NonFinite",
        7,
        ["total"],
    )
    steps = reader.steps([run.id])
    assert steps["step"].tolist() == list(range(30))
    assert steps["nonfinite"][7] == 4 and steps["nonfinite"].sum() == 4
    assert np.isnan(steps["total"][7]) and np.isfinite(steps["duration_seconds"]).all()
    (report,) = reader.step_reports([run.id])
    assert report["step"] == 7 and report["nonfinite"][0]["key"] == "orthogonality"
    names = {(s.key, s.name, s.quantity) for s in reader.series([run.id])}
    assert ("l2_weighted", "l2", "weighted") in names
    assert ("l2_param_grad_norm", "l2", "param_grad_norm") in names
    assert ("l2_grad_norm", "l2", "grad_norm") in names
    assert ("total", None, "total") in names and ("_loss", None, "_loss") in names


def test_incremental_reads_return_only_new_rows(tmp_path):
    path = tmp_path / "s.db"
    w = store.StoreWriter(path, flush_interval=1e9)
    w.open_run(_info())
    reader = store.StoreReader(path)
    run_id = reader.runs()[0].id
    for r in synthetic_run("r", 10):
        w.add_step(r)
    w.flush()
    first = reader.values([run_id])
    steps = reader.steps([run_id])
    assert first["id"].size == 10 * (len(synthetic_record("r", 0).values) + 4)
    for r in synthetic_run("r", 5, start=10):
        w.add_step(r)
    w.flush()
    new = reader.values([run_id], since_id=int(first["id"][-1]))
    assert set(new["step"].tolist()) == set(range(10, 15))
    more = reader.steps([run_id], since_id=int(steps["id"][-1]))
    assert more["step"].tolist() == list(range(10, 15))
    assert reader.steps([run_id], limit=3)["step"].tolist() == [12, 13, 14]
    w.close()


@pytest.mark.parametrize("writers", [1, 2, "shuffled"])
def test_rollups_equal_an_independent_numpy_aggregation(tmp_path, writers):
    path = tmp_path / "s.db"
    # Several flushes, so buckets are merged across transactions; NaN, Inf and a spike.
    # With two writers the second (a resumed run: nothing cached) fills the odd steps
    # below 1000 into buckets the first stored, backwards, then the steps after 1000.
    # Shuffled: one writer whose later batches return to buckets it wrote earlier (the
    # writer queries the file only for buckets at or below the highest it knows there).
    records = list(
        synthetic_run(
            "r",
            1500,
            nan_at=(100, 700),
            spike_at=(1234,),
            penalties=("l1", "l2"),
            diagnostics=False,
        )
    )
    if writers == 1:
        _write(path, records, batch_size=97)
    elif writers == "shuffled":
        order = np.random.default_rng(3).permutation(len(records))
        _write(path, [records[i] for i in order], batch_size=97)
    else:
        first = [r for r in records if r.step < 1000 and r.step % 2 == 0]
        second = [r for r in records if r.step < 1000 and r.step % 2][::-1]
        _write(path, first, batch_size=97)
        _write(path, second + [r for r in records if r.step >= 1000], batch_size=97)
    reader = store.StoreReader(path)
    run_id = reader.runs()[0].id
    series = {s.key: s.id for s in reader.series([run_id])}
    steps = np.array([r.step for r in records])
    for key in ("loss", "l2_weighted", "total", "_duration_seconds"):
        raw = np.array([r.values[key] if key[0] != "_" else r.duration_seconds for r in records])
        for width in store.ROLLUP_WIDTHS[:3]:
            got = reader.rollup(series[key], width=width)
            buckets = np.unique(steps // width)
            assert got["bucket"].tolist() == buckets.tolist()
            for b, row in zip(buckets, got, strict=True):
                v = raw[steps // width == b]
                f = v[np.isfinite(v)]
                assert row["n"] == v.size
                assert row["n_nan"] == np.isnan(v).sum() and row["n_inf"] == np.isinf(v).sum()
                if f.size:
                    assert row["vmin"] == pytest.approx(f.min(), rel=1e-12)
                    assert row["vmax"] == pytest.approx(f.max(), rel=1e-12)
                    assert row["vsum"] == pytest.approx(f.sum(), rel=1e-9)
                else:
                    assert np.isnan(row["vmin"]) and np.isnan(row["vsum"])
    spike = reader.rollup(series["loss"], width=128)
    assert spike["vmax"].max() == pytest.approx(records[1234].values["loss"])


def test_a_run_writing_forward_reads_no_rollup_buckets_after_its_first_batch(tmp_path):
    """docs/telemetry.md: the writer queries stored buckets only where a batch returns to
    buckets at or below the highest the file holds."""
    w = store.StoreWriter(tmp_path / "s.db")
    w.open_run(_info())
    records = list(synthetic_run("r", 400, penalties=("l1",), diagnostics=False))
    w.write(records[:50])
    statements: list[str] = []
    w._conn.set_trace_callback(statements.append)
    for i in range(50, 400, 50):
        w.write(records[i : i + 50])
    reads = [q for q in statements if q.lstrip().upper().startswith("SELECT")]
    assert not any("rollups" in q for q in reads), reads
    statements.clear()
    w.write([synthetic_record("r", 3, penalties=("l1",), diagnostics=False)])  # back again
    assert any("FROM rollups" in q for q in statements)
    w.close()
    reader = store.StoreReader(tmp_path / "s.db")
    series = reader.series([reader.runs()[0].id])
    got = reader.rollup(next(s.id for s in series if s.key == "loss"), width=store.ROLLUP_WIDTHS[0])
    assert int(got["n"].sum()) == 401  # the step written twice counts in its bucket


def test_bucketize_combine_envelope_keep_spikes():
    rng = np.random.default_rng(0)
    steps = np.arange(200_000)
    values = rng.normal(size=steps.size)
    values[123_457] = 1e3
    values[5] = np.nan
    values[6] = -np.inf
    width = store.choose_width(steps.size)
    assert width == 1024
    b = store.bucketize(steps, values, width)
    assert b.size == -(-steps.size // width)
    x, y = store.envelope(b, width)
    assert x.size == 2 * b.size and np.nanmax(y) == 1e3
    assert b["n_nan"].sum() == 1 and b["n_inf"].sum() == 1 and b["n"].sum() == steps.size
    # combining two halves (e.g. two processes) equals bucketing everything at once
    halves = store.combine(
        [
            store.bucketize(steps[::2], values[::2], width),
            store.bucketize(steps[1::2], values[1::2], width),
        ]
    )
    for field in ("n", "n_nan", "n_inf", "step_lo", "step_hi"):
        np.testing.assert_array_equal(halves[field], b[field])
    for field in ("vmin", "vmax", "vsum"):
        np.testing.assert_allclose(halves[field], b[field], rtol=1e-12)
    np.testing.assert_allclose(
        store.mean(b)[1:],
        [np.mean(values[k * width : (k + 1) * width]) for k in range(1, b.size)],
        rtol=1e-9,
    )


def test_choose_width_and_validation():
    assert store.choose_width(1000) == 1
    assert store.choose_width(1001) == 16
    assert store.choose_width(200_000) == 1024
    assert store.choose_width(10**12) == store.ROLLUP_WIDTHS[-1]
    with pytest.raises(ValueError, match="max_buckets"):
        store.choose_width(10, max_buckets=0)
    with pytest.raises(ValueError, match="StoreWriter: batch_size"):
        store.StoreWriter("x.db", batch_size=0)
    with pytest.raises(ValueError, match=r"StoreReader\.rollup: width"):
        store.StoreReader.rollup(None, 1, width=3)  # type: ignore[arg-type]


# --- run statuses: the reader's `crashed` verdict (SPEC section 11) -------------------


def _set_run(path, run: str, **columns) -> None:
    """Set ``runs`` columns of one run with raw SQL (as another writer would)."""
    sets = ", ".join(f"{k} = ?" for k in columns)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"UPDATE runs SET {sets} WHERE name = ?", (*columns.values(), run))
    conn.close()


def test_stale_running_run_reads_as_crashed(tmp_path):
    path = tmp_path / "s.db"
    w = store.StoreWriter(path)
    for run in ("fresh", "stale", "done"):
        w.open_run(_info(run))
    w.finish_run("done", 0)
    w.flush()
    now = time.time()
    _set_run(path, "fresh", updated_at=now - 5)
    _set_run(path, "stale", updated_at=now - 30)
    _set_run(path, "done", updated_at=now - 3600)
    status = {r.name: r.status for r in store.StoreReader(path, stale_after=10).runs(now=now)}
    assert status == {"fresh": "running", "stale": "crashed", "done": "finished"}
    # the limit is the reader's: a more patient reader still sees both running
    patient = store.StoreReader(path, stale_after=60).runs(now=now)
    assert {r.name: r.status for r in patient}["stale"] == "running"
    # the default limit is the shared threshold
    default = store.StoreReader(path)
    assert default.stale_after == thresholds.STALE_AFTER_SECONDS
    _set_run(path, "stale", updated_at=now - thresholds.STALE_AFTER_SECONDS - 1)
    assert {r.name: r.status for r in default.runs(now=now)}["stale"] == "crashed"
    # a heartbeat brings it back: the verdict is never written
    _set_run(path, "stale", updated_at=now)
    assert {r.name: r.status for r in default.runs(now=now)}["stale"] == "running"
    conn = sqlite3.connect(path)
    stored = dict(conn.execute("SELECT name, status FROM runs").fetchall())
    assert stored == {"fresh": "running", "stale": "running", "done": "finished"}
    w.close()


@pytest.mark.parametrize("status", ["stopped", "failed", "finished"])
def test_ended_statuses_pass_through_however_old(tmp_path, status):
    path = tmp_path / "s.db"
    _write(path, [synthetic_record("r", 0)])
    _set_run(path, "r", status=status, updated_at=time.time() - 10**6)
    (run,) = store.StoreReader(path, stale_after=1).runs()
    assert run.status == status and run.last_step == 0


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "60", None, True])
def test_stale_after_is_validated(tmp_path, bad):
    path = tmp_path / "s.db"
    path.touch()
    with pytest.raises(ValueError) as info:
        store.StoreReader(path, stale_after=bad)
    message = str(info.value)
    assert "StoreReader" in message and "'stale_after'" in message
    assert "> 0" in message and repr(bad) in message


def test_dashboard_reads_walk_an_index_and_never_sort_or_scan_a_run(tmp_path):
    """The reads a refresh makes cost the rows returned, not the run (SPEC §9 refresh bars).

    Every statement the reader runs for a refresh is explained by SQLite itself: none may
    scan ``steps`` or sort it in a temporary B-tree, which is what made a cold refresh of a
    10^6-step run take seconds. Two interleaved runs check the per-run results merge in
    id order.
    """
    path = tmp_path / "s.db"
    w = store.StoreWriter(path, flush_interval=1e9)
    w.open_run(_info("a"))
    w.open_run(_info("b"))
    for ra, rb in zip(
        synthetic_run("a", 40, nan_at=(5, 30)), synthetic_run("b", 40, nan_at=(9,)), strict=True
    ):
        w.add_step(ra)
        w.add_step(rb)
    w.close()
    reader = store.StoreReader(path)
    ids = [r.id for r in reader.runs()]
    statements: list[str] = []
    reader._conn.set_trace_callback(statements.append)
    steps = reader.steps(ids, limit=7)
    reports = reader.step_reports(ids, limit=2)
    span = reader.step_span(ids)
    reader._conn.set_trace_callback(None)

    assert np.all(np.diff(steps["id"]) > 0) and steps["id"].size == 7
    assert steps["step"].tolist() == [36, 37, 37, 38, 38, 39, 39]  # b36, a37, b37, ...
    assert [r["step"] for r in reports] == [30, 9]  # newest first, across both runs
    assert span == (0, 39)
    assert len(statements) >= 3 * len(ids)
    for sql in statements:
        plan = " | ".join(row[3] for row in reader._conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "SCAN steps" not in plan and "TEMP B-TREE" not in plan, (sql, plan)
    reader.close()


@pytest.mark.parametrize("limit", [None, 7])
def test_insert_rows_keeps_order_in_few_statements(limit):
    """The writer inserts a batch with multi-row VALUES statements (sqlite3 releases the
    GIL around each statement: executemany would give it up once per row)."""
    from penwatch.store._rows import MAX_ROWS_PER_STATEMENT, insert_rows

    conn = sqlite3.connect(":memory:", isolation_level=None)
    if limit is not None:
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)  # 3 rows of 2 fit
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a INTEGER, b TEXT)")
    conn.execute("CREATE UNIQUE INDEX t_a ON t (a)")
    statements = []
    conn.set_trace_callback(statements.append)
    total = 0
    for n in (0, 1, 2, 3, 255, 256, 257, 600):
        statements.clear()
        rows = [(total + i, f"r{total + i}") for i in range(n)]
        insert_rows(conn, "INSERT INTO t (a, b) VALUES", rows)
        total += n
        per = 2 if limit else MAX_ROWS_PER_STATEMENT
        assert len(statements) <= n // per + per.bit_length(), (n, len(statements))
    got = conn.execute("SELECT a, b FROM t ORDER BY id").fetchall()
    assert got == [(i, f"r{i}") for i in range(total)]
    insert_rows(  # an upsert tail
        conn, "INSERT INTO t (a, b) VALUES", [(0, "x"), (total, "y")],
        tail="ON CONFLICT (a) DO UPDATE SET b = excluded.b",
    )  # fmt: skip
    assert conn.execute("SELECT b FROM t WHERE a IN (0, ?) ORDER BY a", (total,)).fetchall() == [
        ("x",),
        ("y",),
    ]
