"""`penwatch demo` end to end (a subprocess), and the CLI's help."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from penwatch import cli


def test_demo_runs_end_to_end(tmp_path):
    db = tmp_path / "runs" / "demo.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-m", "penwatch.cli", "demo", "--steps", "25", "--no-dashboard",
         "--step-delay", "0", "--metrics-port", "0", "--db", str(db), "--run", "cli-test",
         "--inject-nan-at", "10"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done: 25 steps recorded" in out.stdout
    assert "metrics http://127.0.0.1:" in out.stdout
    assert "first non-finite metric 'orthogonality_weight'" in out.stderr
    with sqlite3.connect(db) as conn:
        (status,) = conn.execute("SELECT status FROM runs WHERE name = 'cli-test'").fetchone()
        steps = conn.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
        events = conn.execute("SELECT step, kind, name FROM events").fetchall()
        names = {n for (n,) in conn.execute("SELECT DISTINCT name FROM series")}
    assert status == "finished" and steps == 25
    assert (10, "nonfinite", "NonFinite") in events
    assert {"entropy", "output_magnitude", "orthogonality", "l1", "l2", "base"} <= names


def test_help_explains_each_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "demo" in text and "dashboard" in text
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--steps", "--db", "--run", "--metrics-port", "--inject-nan-at",
                 "--no-dashboard", "--dashboard-port", "--step-delay"):  # fmt: skip
        assert flag in text
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in text and "runs/penwatch.db" in text
    with pytest.raises(SystemExit):
        cli.main(["dashboard", "--help"])
    text = capsys.readouterr().out
    assert "--db" in text and "--prometheus" in text and "--port" in text


def test_dashboard_command_is_headless_streamlit():
    command = cli._dashboard_command(8599, "127.0.0.1")
    assert command[1:4] == ["-m", "streamlit", "run"]
    assert command[4].endswith(os.path.join("dashboard", "app.py"))
    assert command[command.index("--server.port") + 1] == "8599"
    assert command[command.index("--server.headless") + 1] == "true"
    env = cli._dashboard_env("x.db", "http://prom:9090")
    assert env["PENWATCH_DB"].endswith("x.db")
    assert env["PENWATCH_PROMETHEUS_URL"] == "http://prom:9090"


def test_demo_rejects_bad_steps(capsys):
    assert cli.main(["demo", "--steps", "0", "--no-dashboard"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
