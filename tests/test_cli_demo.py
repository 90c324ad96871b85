"""`penwatch demo` end to end (a subprocess), and the CLI's help."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from penwatch import cli
from penwatch.schema import Event

pytestmark = pytest.mark.concurrent


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
    # readable output: a progress line (the last state), warnings, no per-step INFO lines
    assert "penwatch demo: step 25/25 |" in out.stdout and "non-finite steps 1" in out.stdout
    assert " INFO " not in out.stderr and "run=cli-test step=3 " not in out.stderr
    assert len(out.stdout.splitlines()) <= 4, out.stdout
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


def test_demo_trains_until_ctrl_c_with_metrics_live(tmp_path):
    """Without --steps the demo keeps training (and /metrics answering) until SIGINT."""
    db = tmp_path / "demo.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "penwatch.cli", "demo", "--no-dashboard", "--step-delay",
         "0.01", "--metrics-port", "0", "--db", str(db), "--run", "forever"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        first = proc.stdout.readline()
        assert "training until Ctrl-C" in first, first + proc.stderr.read()[-2000:]
        url = re.search(r"metrics (http://\S+/metrics)", first).group(1)

        def scraped_step() -> float:
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            match = re.search(r'^penwatch_step\{[^}]*run="forever"[^}]*\} (\S+)$', text, re.M)
            return float(match.group(1)) if match else -1.0

        deadline = time.monotonic() + 120
        while scraped_step() < 100:  # well past where a bounded run of old would stop
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.5)
        later = scraped_step()
        time.sleep(1.0)
        assert scraped_step() > later  # still training, still scraped
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    done = re.search(r"done: (\d+) steps recorded", out)
    assert done and int(done.group(1)) > 100, out
    with sqlite3.connect(db) as conn:
        (status, last) = conn.execute("SELECT status, last_step FROM runs").fetchone()
        (stored,) = conn.execute("SELECT COUNT(*) FROM steps").fetchone()
    assert status == "stopped" and stored == int(done.group(1)) == last + 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_is_rewritten_in_place_with_logs_above_it(monkeypatch):
    from penwatch._demo._progress import Progress
    from penwatch.store._synthetic import synthetic_record

    term = _Terminal()
    progress = Progress(10, stream=term, refresh=1e9)
    monkeypatch.setattr(sys, "stderr", term)
    handler = progress.log_handler()
    logger = logging.getLogger("penwatch.test-progress")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        sink = progress.sink()
        for step in range(3):
            sink.write_step(synthetic_record("r", step, nan=step == 1))
        sink.write_event(Event("r", 0, 2, 0.0, "alert", "LossSpike", "m"))
        logger.warning("a warning")
        progress.finish()
    finally:
        logger.removeHandler(handler)
    text = term.getvalue()
    assert "\n" not in text.split("a warning")[0]  # only \r rewrites before the log line
    last = text.rstrip("\n").split("\r\x1b[K")[-1]
    assert last.startswith("penwatch demo: step 3/10 |")
    assert "non-finite steps 1" in last and "alerts 1" in last
    assert text.endswith("\n")
