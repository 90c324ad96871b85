"""The SQLite run store's schema (version 2), connection settings and version check.

One writer (the monitor's worker, through :class:`~penwatch.store.StoreWriter`) and any
number of readers (the dashboard, other processes) share one file in WAL mode. A step is
one row of ``steps``: its step-level columns and its metric values packed into one BLOB
(``vals``, float32 when exact; :mod:`penwatch.store._packed`), in the order of its
*layout* — the tuple of *series* (one flat metric key of one pipeline of one run) that
the step recorded, stored once in ``layouts``/``layout_series``. The view ``metric_rows``
unpacks them, in plain SQL, into the flat ``(id, run_id, step, pipeline, name, quantity,
key, value)`` rows that version 1 stored one by one (40 rows of ~21 bytes per step for 40
metrics; now one row of ~230 bytes). Readers take new steps by id (``id > last_seen``)
and long ranges from ``rollups``.

``rollups`` holds per-bucket aggregates of every series at a few fixed bucket widths
(``ROLLUP_WIDTHS``), one row per ``(layout, width, bucket)`` with per-entry arrays, kept
by the writer in the same transaction as the steps, so a reader can draw a 10^6-step run
from a few hundred buckets per series instead of scanning every step. Each bucket keeps
the finite minimum and maximum (spikes stay visible), sum, counts of values, NaN and Inf,
and the step range it covers. Entries are the step-level series ``_loss``, ``_total``,
``_duration_seconds`` and ``_nonfinite`` (the ``steps`` columns of those names; keys
starting with ``_`` are never user metrics), then the layout's keys.

NaN reads as NULL in ``metric_rows`` (SQLite has no NaN); ``+Inf``/``-Inf`` as they are.
"""

from __future__ import annotations

import pathlib
import sqlite3

from penwatch.store._packed import metric_rows_view, pow2_rows

SCHEMA_VERSION = 2
"""Version written to ``meta.schema_version``; readers refuse older and newer stores."""

ROLLUP_WIDTHS: tuple[int, ...] = (16, 128, 1024, 8192, 65536, 524288)
"""Bucket widths (in steps) at which the writer maintains ``rollups``."""

DBL_MAX = 1.7976931348623157e308

DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    process INTEGER NOT NULL DEFAULT 0,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,                    -- running | finished | stopped | failed
    version TEXT, backend TEXT, devices INTEGER,
    config TEXT,                             -- JSON
    last_step INTEGER,
    UNIQUE (name, process));
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    pipeline TEXT NOT NULL,
    name TEXT,                               -- penalty or term; NULL for run-level keys
    quantity TEXT NOT NULL,                  -- value|weighted|weight|grad_norm|finite|
                                             -- param_grad_norm|grad_share|grad_cosine|
                                             -- or the key itself for run-level keys
    key TEXT NOT NULL,                       -- the original flat key
    UNIQUE (run_id, pipeline, key));
CREATE TABLE IF NOT EXISTS layouts (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    pipeline TEXT NOT NULL,
    size INTEGER NOT NULL,                   -- values per step (layout_series rows)
    signature TEXT NOT NULL,                 -- the series ids, comma-separated
    UNIQUE (run_id, pipeline, signature));
CREATE TABLE IF NOT EXISTS layout_series (
    layout_id INTEGER NOT NULL REFERENCES layouts(id),
    idx INTEGER NOT NULL,                    -- position in steps.vals
    series_id INTEGER NOT NULL REFERENCES series(id),
    PRIMARY KEY (layout_id, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS steps (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    pipeline TEXT NOT NULL,
    wall_time REAL NOT NULL,
    loss REAL, total REAL, duration_seconds REAL,
    nonfinite INTEGER NOT NULL DEFAULT 0,    -- count of non-finite metrics
    trace_id TEXT,                           -- hex OpenTelemetry trace id, when tracing
    report TEXT,                             -- JSON non-finite report, when not ok
    layout_id INTEGER NOT NULL REFERENCES layouts(id),
    vals BLOB NOT NULL);                     -- big-endian float32 (when exact) or float64
CREATE TABLE IF NOT EXISTS rollups (           -- a rowid table: rows of ~1 KB stay in-page
    id INTEGER PRIMARY KEY,
    layout_id INTEGER NOT NULL REFERENCES layouts(id),
    width INTEGER NOT NULL,                  -- one of ROLLUP_WIDTHS
    bucket INTEGER NOT NULL,                 -- step / width
    step_lo INTEGER NOT NULL, step_hi INTEGER NOT NULL,
    n BLOB NOT NULL,                         -- per entry, <i4: values in the bucket
    n_nan BLOB, n_inf BLOB,                  -- per entry, <i4; NULL when all zero
    vmin BLOB NOT NULL, vmax BLOB NOT NULL,  -- per entry, <f8, over finite values;
    vsum BLOB NOT NULL,                      --   NaN when the bucket has none
    UNIQUE (layout_id, width, bucket));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    wall_time REAL NOT NULL,
    kind TEXT NOT NULL,                      -- nonfinite | alert | info
    name TEXT NOT NULL, severity TEXT NOT NULL, message TEXT NOT NULL,
    attributes TEXT);                        -- JSON
CREATE TABLE IF NOT EXISTS pow2 (e INTEGER PRIMARY KEY, v REAL NOT NULL);
CREATE INDEX IF NOT EXISTS steps_run_step ON steps (run_id, step);
CREATE INDEX IF NOT EXISTS steps_run_id ON steps (run_id, id);   -- newest rows of a run
CREATE INDEX IF NOT EXISTS steps_run_report ON steps (run_id, id) WHERE report IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_run ON events (run_id, id);
CREATE INDEX IF NOT EXISTS series_run ON series (run_id, id);
CREATE INDEX IF NOT EXISTS layout_series_series ON layout_series (series_id);
""" + metric_rows_view()


class StoreError(RuntimeError):
    """The file is not a usable penwatch store (foreign database, other schema version)."""


class StoreUnavailableError(RuntimeError):
    """A write could not be committed; the records stay buffered for the next flush."""


def writer_connection(path: str | pathlib.Path, *, busy_timeout: float) -> sqlite3.Connection:
    """Open ``path`` for writing: WAL, ``synchronous=NORMAL``, a busy timeout, schema ready.

    Args:
      path: database file; its parent directory is created when missing.
      busy_timeout: seconds to wait on a lock held by another connection.

    Returns:
      An autocommit-mode connection (transactions are explicit ``BEGIN``/``COMMIT``).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        ensure_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def reader_connection(path: str | pathlib.Path, *, busy_timeout: float = 2.0) -> sqlite3.Connection:
    """Open an existing store read-only (never creates the file, never takes a write lock).

    Raises:
      FileNotFoundError: when ``path`` does not exist.
    """
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"penwatch store {str(path)!r} does not exist")
    conn = sqlite3.connect(
        path.as_uri() + "?mode=ro", uri=True, timeout=busy_timeout, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    return conn


def schema_version(conn: sqlite3.Connection) -> int | None:
    """The store's schema version; ``None`` for an empty database (no tables yet).

    Raises:
      StoreError: the database has tables but no penwatch ``meta`` version, or a
        version other than :data:`SCHEMA_VERSION`.
    """
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        return None
    if "meta" not in tables:
        raise StoreError(f"not a penwatch store: tables {sorted(tables)} but no 'meta' table")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        return None
    version = int(row[0])
    if version < SCHEMA_VERSION:
        raise StoreError(
            f"store schema version {version} (one row per metric value) is older than the "
            f"version this penwatch reads and writes ({SCHEMA_VERSION}, one packed row per "
            "step); it cannot be upgraded in place: read it with the penwatch that wrote "
            "it, and give new runs a new store file"
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store schema version {version} is newer than this penwatch supports "
            f"({SCHEMA_VERSION}); upgrade penwatch to read it"
        )
    return version


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the schema in an empty database (a store of this version is left as is)."""
    if schema_version(conn) == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if schema_version(conn) is None:  # re-checked under the write lock
            for statement in _statements(DDL):
                conn.execute(statement)
            conn.executemany("INSERT INTO pow2 (e, v) VALUES (?, ?)", pow2_rows())
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    """Split a DDL script into statements (no semicolons inside our statements)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
