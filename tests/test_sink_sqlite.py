"""pw.sinks.SQLite: content equals what was recorded (also under a concurrent reader
process), and faults (read-only, deleted file or directory, locked, full) never lose data
silently."""

from __future__ import annotations

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

import penwatch as pw
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
        except sinks.SinkUnavailable:
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


def _values(step: int) -> dict[str, float]:
    return {"l1": float(step), "l1_weight": 1.0, "l1_weighted": float(step), "total": 1.0}


def _stored_steps(path) -> list[int]:
    return [s for s, _, _ in store.StoreReader(path).records("r")]


def test_the_sink_raises_sink_unavailable_and_keeps_nothing_itself(tmp_path):
    # The outage buffer is the monitor's per-sink worker (one buffer, sized by the user):
    # the sink itself raises and holds nothing, and a retry never duplicates.
    path = tmp_path / "s.db"
    sink = sinks.SQLite(path, busy_timeout=0.05)
    sink.open(_info())
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    records = list(synthetic_run("r", 12))
    with pytest.raises(sinks.SinkUnavailable, match="locked"):
        sink.write_steps(records)
    assert sink.writer.pending == 0
    blocker.execute("ROLLBACK")
    sink.write_steps(records)
    sink.close()
    _same_values(store.StoreReader(path).records("r"), records)


def test_locked_store_keeps_records_and_never_duplicates(tmp_path):
    path = tmp_path / "s.db"
    monitor = pw.Monitor("r", sinks=[sinks.SQLite(path, busy_timeout=0.05)], alerts=[])
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    for step in range(12):
        monitor.record(step, _values(step))
    assert not monitor.flush(timeout=0.5)  # locked: not written yet
    held = monitor.stats.sinks["SQLite"]
    assert held.errors >= 1 and held.written == 0 and held.pending == 12
    blocker.execute("ROLLBACK")
    assert monitor.close()
    assert _stored_steps(path) == list(range(12))
    assert monitor.stats.lost("SQLite") == 0


def test_full_disk_then_recovers(tmp_path):
    path = tmp_path / "s.db"
    sink = sinks.SQLite(path)
    monitor = pw.Monitor("r", sinks=[sink], alerts=[])
    assert monitor.flush(timeout=10)
    conn = sink.writer._connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 1}")  # SQLITE_FULL, like a full disk
    for step in range(200):
        monitor.record(step, _values(step))
    assert monitor.close()  # the retry opens a fresh connection, with no page limit
    stats = monitor.stats.sinks["SQLite"]
    assert stats.errors >= 1 and stats.written == 200
    assert _stored_steps(path) == list(range(200))


def test_bounded_buffer_reports_what_was_lost(tmp_path):
    path = tmp_path / "s.db"
    monitor = pw.Monitor(
        "r", sinks=[sinks.SQLite(path, max_pending=10, busy_timeout=0.01)], alerts=[]
    )
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    for step in range(25):
        monitor.record(step, _values(step))
    assert not monitor.flush(timeout=0.5)
    held = monitor.stats.sinks["SQLite"]
    assert held.pending == 10 and held.lost["overflow"] == 15
    blocker.execute("ROLLBACK")
    assert monitor.close()
    assert _stored_steps(path) == list(range(15, 25))
    reader = store.StoreReader(path)
    (run,) = reader.runs()
    (gap,) = [e for e in reader.events([run.id]) if e.name == "records_dropped"]
    assert gap.attributes["count"] == 15 and gap.attributes["reason"] == "overflow"
    assert (gap.attributes["first_step"], gap.attributes["last_step"]) == (0, 14)
    assert "15 step records" in gap.message
    assert monitor.stats.sinks["SQLite"].lost == {"overflow": 15, "poison": 0, "unfinished": 0}


_READONLY_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import penwatch as pw
    path = sys.argv[1]
    if os.getuid() == 0:  # root ignores file modes: continue as an unprivileged user
        os.setgid(65534)
        os.setuid(65534)
    monitor = pw.Monitor("ro", sinks=[pw.sinks.SQLite(path)], alerts=[], close_timeout=60)
    for step in range(20):
        monitor.record(step, {"l1": 1.0, "l1_weight": 1.0, "total": 1.0})
    monitor.flush(timeout=1.0)
    s = monitor.stats.sinks["SQLite"]
    print("blocked", s.errors, s.pending, flush=True)
    deadline = time.time() + 30
    while not os.access(path, os.W_OK) and time.time() < deadline:
        time.sleep(0.02)
    monitor.close()
    s = monitor.stats.sinks["SQLite"]
    print("done", s.written, sum(s.lost.values()), flush=True)
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
    assert first and first[0] == "blocked", proc.stderr.read()
    assert int(first[1]) > 0 and int(first[2]) == 20  # failures raised, all 20 held
    for f in tmp_path.iterdir():  # like `chmod 666 ro.db*`: SQLite gives -wal/-shm its mode
        os.chmod(f, 0o666)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    assert out.split() == ["done", "20", "0"]
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
