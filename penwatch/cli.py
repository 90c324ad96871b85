"""The ``penwatch`` command: ``penwatch demo``, ``penwatch dashboard``, ``penwatch replay``.

``penwatch demo`` trains a small MLP on synthetic data with five penalties and gradient
diagnostics, records every step to Prometheus (``/metrics``), the SQLite store, the
log and (when the ``OTEL_*`` variables ask for it) OpenTelemetry over OTLP/HTTP, can
inject a NaN at a chosen step, and opens the Streamlit dashboard on the store.
``penwatch dashboard`` opens the dashboard alone. ``penwatch replay`` names the line
that made a captured step non-finite (:mod:`penwatch.forensics`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from penwatch import _extras
from penwatch.forensics._cli import add_replay_parser, replay_command

__all__ = ["main"]

logger = logging.getLogger("penwatch.demo")

DEFAULT_DB = "runs/penwatch.db"

_DEMO_HELP = """\
Train a small MLP on synthetic data with five penalties (entropy of the predictions,
output magnitude, orthogonality of the first layer, L1 and L2 of the weights) and
gradient diagnostics every 5 steps until Ctrl-C (or for --steps steps), recording every
step to:
  * Prometheus: http://ADDR:PORT/metrics (--metrics-port, --metrics-addr or
    PENWATCH_METRICS_ADDR); the run goes on if the port is taken;
  * the SQLite store (--db) that the dashboard reads;
  * one progress line on the terminal (warnings and alerts are logged above it);
  * OpenTelemetry spans over OTLP/HTTP, only when OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_TRACES_EXPORTER is set (the exporter
    reads the standard OTEL_* variables itself; service.name defaults to "penwatch").
Alerts: NonFinite, GradientDominance, GradientConflict, LossSpike.
--inject-nan-at K makes the orthogonality weight NaN at step K: watch the non-finite
counter, the alert, the span status and the report naming the term and the leaf.
Unless --no-dashboard, the Streamlit dashboard (the 'dashboard' extra) starts first on
--dashboard-port; after a bounded run (--steps) it keeps running until Ctrl-C.
"""

_DASHBOARD_HELP = """\
Run the Streamlit dashboard (dashboard/app.py) on a penwatch SQLite store (--db or
PENWATCH_DB) or on a Prometheus server (--prometheus or PENWATCH_PROMETHEUS_URL).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="penwatch",
        description="penwatch: see every penalty of a JAX training run while it trains.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,dashboard,replay}", required=True)
    demo = sub.add_parser(
        "demo",
        help="run an instrumented example training run and open the dashboard",
        description=_DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: train until Ctrl-C, with /metrics live all along)",
    )
    demo.add_argument("--db", default=DEFAULT_DB, help=f"SQLite store (default {DEFAULT_DB})")
    demo.add_argument("--run", default=None, help="run name (default demo-<date>-<time>)")
    demo.add_argument(
        "--metrics-port", type=int, default=9464, help="Prometheus /metrics port (0: any free)"
    )
    demo.add_argument(
        "--metrics-addr",
        default=os.environ.get("PENWATCH_METRICS_ADDR", "127.0.0.1"),
        help="address to serve /metrics on (default 127.0.0.1 or $PENWATCH_METRICS_ADDR)",
    )
    demo.add_argument(
        "--inject-nan-at", type=int, default=None, metavar="STEP", help="make step STEP NaN"
    )
    demo.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    demo.add_argument("--dashboard-port", type=int, default=8501, help="dashboard port")
    demo.add_argument(
        "--step-delay",
        type=float,
        default=0.05,
        metavar="SECONDS",
        help="pause between steps so the run can be watched live (default 0.05)",
    )
    demo.add_argument("--seed", type=int, default=0, help="parameter and data seed")
    dash = sub.add_parser(
        "dashboard",
        help="run the Streamlit dashboard on a store or a Prometheus server",
        description=_DASHBOARD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dash.add_argument("--db", default=os.environ.get("PENWATCH_DB", DEFAULT_DB))
    dash.add_argument("--prometheus", default=os.environ.get("PENWATCH_PROMETHEUS_URL"))
    dash.add_argument("--port", type=int, default=8501)
    dash.add_argument("--addr", default="127.0.0.1", help="address to serve on")
    add_replay_parser(sub)
    return parser


def _app_path() -> pathlib.Path:
    """The dashboard script, wherever ``penwatch.dashboard`` is installed from."""
    spec = importlib.util.find_spec("penwatch.dashboard")
    if spec is None or spec.origin is None:
        return pathlib.Path(__file__).resolve().parent / "dashboard" / "app.py"  # absent
    return pathlib.Path(spec.origin).resolve().parent / "app.py"


def _dashboard_command(port: int, addr: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(_app_path()),
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        addr,
        "--browser.gatherUsageStats",
        "false",
    ]


def _dashboard_env(db: str | None, prometheus: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if db:
        env["PENWATCH_DB"] = str(pathlib.Path(db).resolve())
    if prometheus:
        env["PENWATCH_PROMETHEUS_URL"] = prometheus
    return env


def _need_streamlit(feature: str) -> None:
    """Raise :class:`~penwatch._extras.MissingExtraError` unless Streamlit is installed."""
    _extras.require("streamlit", extra="dashboard", feature=feature, load=False)


def _start_dashboard(db: str, port: int) -> subprocess.Popen[Any] | None:
    try:
        _need_streamlit("the demo's dashboard")
    except _extras.MissingExtraError as exc:
        print(f"penwatch demo: {exc}; training without it", file=sys.stderr, flush=True)
        return None
    if not _app_path().exists():
        print(
            f"penwatch: the dashboard app ({_app_path()}) is not there; the store is {db}",
            flush=True,
        )
        return None
    proc = subprocess.Popen(
        [*_dashboard_command(port, "127.0.0.1"), "--", "--db", str(pathlib.Path(db).resolve())],
        env=_dashboard_env(db, None),
    )
    print(f"penwatch: dashboard on http://127.0.0.1:{port} (store {db})", flush=True)
    return proc


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def demo(args: argparse.Namespace) -> int:
    """``penwatch demo``: returns the exit status."""
    import penwatch as pw
    from penwatch._demo import _progress, _train
    from penwatch._demo._tracing import configure_tracing, shutdown_tracing

    if args.steps is not None and args.steps < 1:
        print(f"penwatch demo: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    progress = _progress.Progress(args.steps)
    logging.basicConfig(level=logging.WARNING, handlers=[progress.log_handler()])
    run_name = args.run or time.strftime("demo-%Y%m%d-%H%M%S")
    pathlib.Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    tracing = configure_tracing(service_name="penwatch")
    prometheus = pw.sinks.Prometheus(port=args.metrics_port, addr=args.metrics_addr)
    # warnings (non-finite steps) and alerts are logged; the step lines become the progress line
    logs = pw.sinks.Logging(level=logging.DEBUG)
    sinks: list[pw.sinks.Sink] = [prometheus, pw.sinks.SQLite(args.db), logs, progress.sink()]
    if tracing is not None:
        from opentelemetry import trace

        provider, _ = tracing
        trace.set_tracer_provider(provider)
        sinks.append(pw.sinks.OpenTelemetry(provider))
    alerts = [
        pw.alerts.NonFinite(),
        pw.alerts.GradientDominance(),
        pw.alerts.GradientConflict(),
        pw.alerts.LossSpike(),
    ]
    dashboard = None if args.no_dashboard else _start_dashboard(args.db, args.dashboard_port)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    monitor = pw.Monitor(
        run_name,
        sinks=sinks,
        alerts=alerts,
        config={
            "command": "penwatch demo",
            "steps": args.steps or "until stopped",
            "seed": args.seed,
        },
    )
    where = prometheus.url or f"(port {args.metrics_port} unavailable, see the log)"
    length = f"{args.steps} steps" if args.steps else "training until Ctrl-C"
    print(
        f"penwatch demo: run {run_name!r}: {length}; metrics {where}; store "
        f"{args.db}" + ("; OTLP tracing on" if tracing else ""),
        flush=True,
    )
    status = 0
    try:
        _train.run(
            monitor,
            steps=args.steps,
            inject_nan_at=args.inject_nan_at,
            step_delay=args.step_delay,
            seed=args.seed,
            stop=stop,
        )
    except KeyboardInterrupt:
        status = 130
    finally:
        monitor.close()
        progress.finish()
        if tracing is not None:
            shutdown_tracing(tracing[0])
    if status == 0 and monitor.stop_signal == signal.SIGINT:
        status = 130  # Ctrl-C whose KeyboardInterrupt was swallowed: the loop saw it
    stats = monitor.stats
    print(
        f"penwatch demo: done: {stats.processed} steps recorded, {stats.events} events, "
        f"lost before the sinks {sum(stats.dropped.values())}, per sink written/lost "
        f"{ {n: (s.written, stats.lost(n)) for n, s in stats.sinks.items()} }",
        flush=True,
    )
    if dashboard is not None and status == 0 and not stop.is_set():
        print("penwatch demo: the dashboard keeps running; Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while dashboard.poll() is None and not stop.wait(0.5):  # SIGTERM sets stop
                pass
    _stop(dashboard)
    signal.signal(signal.SIGTERM, previous)
    return status


def dashboard(args: argparse.Namespace) -> int:
    """``penwatch dashboard``: runs Streamlit in the foreground."""
    try:
        _need_streamlit("penwatch dashboard")
    except _extras.MissingExtraError as exc:
        print(f"penwatch dashboard: {exc}", file=sys.stderr)
        return 1
    if not _app_path().exists():
        print(f"penwatch dashboard: {_app_path()} not found", file=sys.stderr)
        return 1
    command = _dashboard_command(args.port, args.addr)
    extra = ["--db", str(pathlib.Path(args.db).resolve())] if args.db else []
    if args.prometheus:
        extra += ["--prometheus", args.prometheus]
    print(f"penwatch dashboard: http://{args.addr}:{args.port}", flush=True)
    try:
        return subprocess.call(
            [*command, "--", *extra], env=_dashboard_env(args.db, args.prometheus)
        )
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``penwatch`` console script."""
    args = _parser().parse_args(argv)
    return {"demo": demo, "dashboard": dashboard, "replay": replay_command}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
