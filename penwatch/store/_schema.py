"""The SQLite run store's schema (version 1), connection settings and version check.

One writer (the monitor's worker, through :class:`~penwatch.store.StoreWriter`) and any
number of readers (the dashboard, other processes) share one file in WAL mode. Metric
values are stored long-format, one row per ``(series, step)``, where a *series* is one
flat metric key of one pipeline of one run (``series``); ``metric_rows`` joins them back
into the flat ``(run_id, step, pipeline, name, quantity, key, value)`` shape. ``metrics``
has no secondary index (an index would double the cost of every insert): readers take
new rows by id (``id > last_seen``, starting at the run's ``metrics_from``) and long
ranges from ``rollups``.

``rollups`` holds per-bucket aggregates of every series at a few fixed bucket widths
(``ROLLUP_WIDTHS``), maintained by the writer in the same transaction as the raw rows, so
a reader can draw a 200,000-step run from a few hundred buckets per series instead of
scanning millions of rows. Each bucket keeps the finite minimum and maximum (spikes stay
visible), sum, counts of NaN and Inf values and the step range it covers.

Besides the recorded metric keys, every step adds the series ``_loss``, ``_total``,
``_duration_seconds`` and ``_nonfinite`` (the ``steps`` columns of the same name; keys
starting with ``_`` are never user metrics), so rollups cover them too.

``value`` is NULL for NaN (SQLite stores NaN as NULL); ``+Inf``/``-Inf`` are stored as is.
"""

from __future__ import annotations

import pathlib
import sqlite3

SCHEMA_VERSION = 1
"""Version written to ``meta.schema_version``; readers refuse newer stores."""

ROLLUP_WIDTHS: tuple[int, ...] = (8, 64, 512, 4096, 32768, 262144)
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
    metrics_from INTEGER NOT NULL DEFAULT 0, -- metrics of this run all have id > this
    UNIQUE (name, process));
CREATE TABLE IF NOT EXISTS steps (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    pipeline TEXT NOT NULL,
    wall_time REAL NOT NULL,
    loss REAL, total REAL, duration_seconds REAL,
    nonfinite INTEGER NOT NULL DEFAULT 0,    -- count of non-finite metrics
    trace_id TEXT,                           -- hex OpenTelemetry trace id, when tracing
    report TEXT);                            -- JSON non-finite report, when not ok
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
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY,
    series_id INTEGER NOT NULL REFERENCES series(id),
    step INTEGER NOT NULL,
    value REAL);                             -- NULL means NaN; +-Inf stored as is
CREATE TABLE IF NOT EXISTS rollups (
    series_id INTEGER NOT NULL REFERENCES series(id),
    width INTEGER NOT NULL,                  -- one of ROLLUP_WIDTHS
    bucket INTEGER NOT NULL,                 -- step / width
    n INTEGER NOT NULL, n_nan INTEGER NOT NULL, n_inf INTEGER NOT NULL,
    vmin REAL, vmax REAL, vsum REAL,         -- over finite values; NULL when none
    step_lo INTEGER NOT NULL, step_hi INTEGER NOT NULL,
    PRIMARY KEY (series_id, width, bucket)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    wall_time REAL NOT NULL,
    kind TEXT NOT NULL,                      -- nonfinite | alert | info
    name TEXT NOT NULL, severity TEXT NOT NULL, message TEXT NOT NULL,
    attributes TEXT);                        -- JSON
CREATE INDEX IF NOT EXISTS steps_run_step ON steps (run_id, step);
CREATE INDEX IF NOT EXISTS events_run ON events (run_id, id);
CREATE INDEX IF NOT EXISTS series_run ON series (run_id, id);
CREATE VIEW IF NOT EXISTS metric_rows AS
    SELECT m.id AS id, s.run_id AS run_id, m.step AS step, s.pipeline AS pipeline,
           s.name AS name, s.quantity AS quantity, s.key AS key, m.value AS value
    FROM metrics AS m JOIN series AS s ON s.id = m.series_id;
"""


class StoreError(RuntimeError):
    """The file is not a usable penwatch store (foreign database, newer schema)."""


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
        version newer than :data:`SCHEMA_VERSION`.
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
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store schema version {version} is newer than this penwatch supports "
            f"({SCHEMA_VERSION}); upgrade penwatch to read it"
        )
    return version


# Migrations from version k to k + 1, run in order inside one transaction. Version 1 is
# the first; a future version appends its upgrade statements here.
MIGRATIONS: dict[int, str] = {}


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the schema in an empty database or migrate an older one to the current version."""
    version = schema_version(conn)
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version is None:
            for statement in _statements(DDL):
                conn.execute(statement)
        else:
            for v in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[v]):
                    conn.execute(statement)
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
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
