"""Live training telemetry: the loop behind ``penwatch demo``, written out to read.

A small MLP learns a synthetic classification task with five penalties; every step's
metrics go to a :class:`penwatch.Monitor` that serves Prometheus metrics, writes the
SQLite store the dashboard reads, logs, and evaluates alerts. The training thread never
waits for the telemetry: ``monitor.record`` only queues the step's device arrays.

    python examples/live_training.py --steps 300 --db runs/penwatch.db
    curl -s 127.0.0.1:9464/metrics | grep penwatch_penalty_weighted_value
    penwatch dashboard --db runs/penwatch.db      # in another terminal

``--inject-nan-at K`` turns the orthogonality penalty's weight into NaN at step K: the
log shows the NonFinite alert naming ``orthogonality`` and ``grads['hidden']['w']``.
"""

from __future__ import annotations

import argparse
import logging
import time

import jax

import penwatch as pw
from penwatch._demo._train import build, init_params, make_batches, with_nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--db", default="runs/penwatch.db")
    parser.add_argument("--run", default="live-training")
    parser.add_argument("--metrics-port", type=int, default=9464)
    parser.add_argument("--inject-nan-at", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # 1. The model, its penalties and a jitted train step (metrics stay on the device).
    init_fn, step_fn = build()  # jitted; gradient diagnostics every 5 steps
    state = init_fn(init_params(jax.random.PRNGKey(0)))
    batches = make_batches(64)

    # 2. A monitor: where the metrics go and what to alert on.
    prometheus = pw.sinks.Prometheus(port=args.metrics_port)
    monitor = pw.Monitor(
        args.run,
        sinks=[prometheus, pw.sinks.SQLite(args.db), pw.sinks.Logging(every=25)],
        alerts=[
            pw.alerts.NonFinite(),  # warn once per NaN/Inf episode, naming the culprit
            pw.alerts.GradientDominance(threshold=0.5, patience=20),
            pw.alerts.GradientConflict(cosine_below=-0.5, patience=20),
            pw.alerts.LossSpike(zscore=6.0, window=128),
        ],
    )
    print(f"metrics: {prometheus.url}  store: {args.db}", flush=True)

    # 3. The loop: dispatch the step, hand its device metrics to the monitor, go on.
    with monitor:
        for step in range(args.steps):
            faulty = step == args.inject_nan_at
            dispatched = time.time_ns()  # taken before dispatch: durations are device time
            new_state, metrics = step_fn(with_nan(state) if faulty else state, batches[step % 64])
            monitor.record(
                step, metrics, pipeline="demo", dispatched_at_ns=dispatched,
            )  # fmt: skip
            state = new_state._replace(pipeline=state.pipeline) if faulty else new_state
    # Leaving the block flushed every sink and closed them.

    stats = monitor.stats
    print(f"recorded {stats.processed} steps, {stats.events} events, dropped {stats.dropped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
