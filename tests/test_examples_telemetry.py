"""examples/live_training.py runs and records what it says."""

from __future__ import annotations

import importlib.util
import pathlib
import sqlite3

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "live_training.py"


def test_live_training_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("live_training", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    db = tmp_path / "live.db"
    argv = ["--steps", "15", "--db", str(db), "--metrics-port", "0", "--inject-nan-at", "5"]
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "metrics: http://127.0.0.1:" in out
    assert "recorded 15 steps, 1 events" in out
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 15
        assert conn.execute("SELECT step, kind FROM events").fetchall() == [(5, "nonfinite")]
