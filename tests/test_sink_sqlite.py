"""pw.sinks.SQLite: content equals what was recorded (also under a concurrent reader
process), and faults (read-only, deleted file or directory, locked, full) never lose data
silently."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from penwatch import sinks, store
from penwatch.schema import Event, RunInfo
from penwatch.store._synthetic import synthetic_record, synthetic_run


def _info(run: str = "r") -> RunInfo:
    return RunInfo(run, 0, "1.0", "cpu", 1, time.time())


def _same_values(stored, records) -> None:
    assert [(s, p) for s, p, _ in stored] == [(r.step, r.pipeline) for r in records]
    for (_, _, values), rec in zip(stored, records, strict=True):
        assert values.keys() == rec.values.keys()
        for k, v in values.items():
            ref = rec.values[k]
            assert (math.isnan(v) and math.isnan(ref)) or v == ref, (rec.step, k, v, ref)


def test_sink_content_equals_records(tmp_path):
    path = tmp_path / "s.db"
    sink = sinks.SQLite(path, batch_size=16)
    sink.open(_info())
    records = list(synthetic_run("r", 100, nan_at=(3, 50)))
    for r in records:
        sink.write_step(r)
    sink.write_event(Event("r", 0, 3, time.time(), "alert", "LossSpike", "spike"))
    sink.close()
    reader = store.StoreReader(path)
    _same_values(reader.records("r"), records)
    (run,) = reader.runs()
    assert run.status == "finished" and run.last_step == 99
    assert [e.name for e in reader.events([run.id])] == ["LossSpike"]


def test_monitor_to_sqlite_equals_what_the_monitor_handed_to_sinks(tmp_path):
    from penwatch.sinks import Callback
    from penwatch.telemetry import Monitor

    path = tmp_path / "m.db"
    seen = []
    with Monitor("mon", sinks=[sinks.SQLite(path), Callback(seen.append)]) as monitor:
        for step in range(40):
            values = synthetic_record("mon", step, nan=step == 20).values
            monitor.record(step, dict(values), loss=values["base_loss"])
    assert len(seen) == 40
    _same_values(store.StoreReader(path).records("mon"), seen)


_READER = textwrap.dedent(
    """
    import sys, time
    from penwatch.store import StoreReader
    path, expected_steps, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    while True:
        try:
            reader = StoreReader(path)
            break
        except FileNotFoundError:
            time.sleep(0.01)
    print("ready", flush=True)
    last_metric, last_step, rows, steps, polls = None, 0, 0, 0, 0
    deadline = time.time() + 60
    while steps < expected_steps and time.time() < deadline:
        runs = reader.runs()
        if not runs:
            continue
        ids = [r.id for r in runs]
        s = reader.steps(ids, since_id=last_step)
        v = reader.values(ids, since_id=last_metric)
        polls += 1
        # Steps are read first, then metrics: every step seen must have all its rows.
        steps += s["step"].size
        rows += v["id"].size
        if s["id"].size:
            last_step = int(s["id"][-1])
        if v["id"].size:
            last_metric = int(v["id"][-1])
        assert rows >= steps * keys, (rows, steps)
        assert rows % keys == 0, rows  # whole transactions only
    print(steps, rows, polls)
    """
)


def test_concurrent_reader_process_sees_whole_transactions(tmp_path):
    """A reader *process* polls while this process writes: it sees every row, whole."""
    path = tmp_path / "c.db"
    n = 600
    keys = len(synthetic_record("r", 0).values) + 4
    sink = sinks.SQLite(path, batch_size=25, flush_interval=0.0)
    sink.open(_info())
    proc = subprocess.Popen(
        [sys.executable, "-c", _READER, str(path), str(n), str(keys)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    records = list(synthetic_run("r", n))
    for i, r in enumerate(records):
        sink.write_step(r)
        if i % 25 == 0:
            time.sleep(0.002)  # let the reader interleave with the writer
    sink.close()
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    steps, rows, polls = map(int, out.split())
    assert (steps, rows) == (n, n * keys)
    assert polls > 1
    _same_values(store.StoreReader(path).records("r"), records)


def _fill(sink, start: int, n: int) -> int:
    failures = 0
    for r in synthetic_run("r", n, start=start):
        try:
            sink.write_step(r)
        except store.StoreUnavailableError:
            failures += 1
    return failures


def test_deleted_file_and_directory_are_recreated(tmp_path, caplog):
    path = tmp_path / "d" / "s.db"
    sink = sinks.SQLite(path, batch_size=10)
    sink.open(_info())
    _fill(sink, 0, 30)
    sink.flush()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / "d" / f"s.db{suffix}").unlink(missing_ok=True)
    assert _fill(sink, 30, 30) == 0
    sink.flush()
    reader = store.StoreReader(path)
    assert [s for s, _, _ in reader.records("r")] == list(range(30, 60))
    (run,) = reader.runs()
    assert "store_recreated" in [e.name for e in reader.events([run.id])]
    shutil.rmtree(tmp_path / "d")
    assert _fill(sink, 60, 10) == 0
    sink.close()
    assert [s for s, _, _ in store.StoreReader(path).records("r")] == list(range(60, 70))
    assert sink.writer.recreated == 2
    assert "deleted or replaced" in caplog.text


def test_locked_store_raises_keeps_records_and_never_duplicates(tmp_path):
    path = tmp_path / "s.db"
    sink = sinks.SQLite(path, batch_size=5, busy_timeout=0.05)
    sink.open(_info())
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    records = list(synthetic_run("r", 12))
    for r in records:
        try:
            sink.write_step(r)
        except store.StoreUnavailableError as exc:
            assert "locked" in str(exc)
            with contextlib.suppress(store.StoreUnavailableError):
                sink.write_step(r)  # the monitor's retry of the same record: no duplicate
    with pytest.raises(store.StoreUnavailableError):
        sink.flush()
    assert sink.pending == 12
    blocker.execute("ROLLBACK")
    sink.close()
    _same_values(store.StoreReader(path).records("r"), records)


def test_full_disk_raises_then_recovers(tmp_path):
    path = tmp_path / "s.db"
    sink = sinks.SQLite(path, batch_size=10_000, flush_interval=1e9)
    sink.open(_info())
    conn = sink.writer._connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 1}")  # SQLITE_FULL, like a full disk
    records = list(synthetic_run("r", 200))
    for r in records:
        sink.write_step(r)
    with pytest.raises(store.StoreUnavailableError, match="full"):
        sink.flush()
    assert sink.pending == 200
    sink.close()  # a fresh connection has no page limit: everything arrives
    _same_values(store.StoreReader(path).records("r"), records)


def test_bounded_buffer_reports_what_was_lost(tmp_path):
    path = tmp_path / "s.db"
    sink = sinks.SQLite(path, batch_size=1, max_pending=10, busy_timeout=0.01)
    sink.open(_info())
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    assert _fill(sink, 0, 25) == 25
    assert sink.pending == 10 and sink.dropped == 15
    blocker.execute("ROLLBACK")
    sink.close()
    reader = store.StoreReader(path)
    assert [s for s, _, _ in reader.records("r")] == list(range(15, 25))
    (run,) = reader.runs()
    (lost,) = [e for e in reader.events([run.id]) if e.name == "store_records_dropped"]
    assert lost.attributes == {"steps": 15, "events": 0, "first_step": 0, "last_step": 14}
    assert "15 step records" in lost.message


_READONLY_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from penwatch import sinks, store
    from penwatch.store._synthetic import synthetic_run
    from penwatch.schema import RunInfo
    path = sys.argv[1]
    records = list(synthetic_run("ro", 20))
    sink = sinks.SQLite(path, batch_size=5)
    if os.getuid() == 0:  # root ignores file modes: continue as an unprivileged user
        os.setgid(65534)
        os.setuid(65534)
    failures = 0
    try:
        sink.open(RunInfo("ro", 0, "1", "cpu", 1, time.time()))
    except store.StoreUnavailableError:
        failures += 1
    for r in records:
        try:
            sink.write_step(r)
        except store.StoreUnavailableError:
            failures += 1
    print("blocked", failures, sink.pending, flush=True)
    deadline = time.time() + 30
    while not os.access(path, os.W_OK) and time.time() < deadline:
        time.sleep(0.02)
    sink.close()
    print("done", sink.pending, sink.dropped, flush=True)
    """
)


def test_read_only_store_blocks_then_recovers_without_loss(request):
    """The store file is read-only (as an unprivileged user), then made writable."""
    # A directory the unprivileged child can reach (pytest's tmp_path is private to root).
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="penwatch-ro-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
    path = tmp_path / "ro.db"
    store.StoreWriter(path).close()  # an existing store, schema only
    os.chmod(tmp_path, 0o777)
    os.chmod(path, 0o444)
    env = dict(os.environ, HOME=str(tmp_path), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-c", _READONLY_CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    first = proc.stdout.readline().split()
    assert first[0] == "blocked", proc.stderr.read()
    assert int(first[1]) > 0 and int(first[2]) == 20  # failures raised, nothing lost
    for f in tmp_path.iterdir():  # like `chmod 666 ro.db*`: SQLite gives -wal/-shm its mode
        os.chmod(f, 0o666)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == ["done", "0", "0"]
    assert [s for s, _, _ in store.StoreReader(path).records("ro")] == list(range(20))


def _reader_proc(path, q):  # pragma: no cover - runs in a child process
    q.put(len(store.StoreReader(path).runs()))


def test_multiprocessing_reader_sees_finished_run(tmp_path):
    path = tmp_path / "s.db"
    sink = sinks.SQLite(path)
    sink.open(_info())
    _fill(sink, 0, 5)
    sink.flush()
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_reader_proc, args=(str(path), q))
    p.start()
    assert q.get(timeout=60) == 1
    p.join(30)
    sink.close()
