"""Multi-process (JAX multi-host) training with one penwatch monitor per process.

Launches ``--num-processes`` CPU processes on this machine that meet through
``jax.distributed.initialize`` (explicit coordinator address, process count and id) and
train one linear-regression model data-parallel: the batch is a global array sharded
over the processes' devices, the parameters are replicated, and the gradient all-reduce
across processes happens inside the jitted step (XLA CPU collectives). Every process
records to its own ``pw.Monitor(process=jax.process_index())`` with a Prometheus
endpoint on ``--metrics-port + index`` and, with ``--db``, the shared SQLite store
(one writer connection per process; the store keys runs by ``(name, process)``).

What each process reports: the penalties and gradient diagnostics of the replicated
parameters (identical on all processes) and the task loss on its own data shard
(different per process; their mean is the global loss).

    python examples/multiprocess_training.py --num-processes 2 --steps 200
    curl -s localhost:9464/metrics | grep penwatch_loss    # process 0
    curl -s localhost:9465/metrics | grep penwatch_loss    # process 1

``--hold S`` keeps the endpoints up for S seconds after training (for a scrape).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--run", default="multiprocess-demo")
    parser.add_argument("--metrics-port", type=int, default=9464, help="process i: port + i")
    parser.add_argument("--metrics-addr", default="127.0.0.1")
    parser.add_argument("--db", default=None, help="shared SQLite store (optional)")
    parser.add_argument("--batch-per-process", type=int, default=64)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds between steps")
    parser.add_argument("--hold", type=float, default=0.0, help="serve metrics S s after")
    parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.num_processes < 1:
        parser.error(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


# --- launcher ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Start one worker per process index; stop them all if one fails or on a signal."""
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *argv, "--coordinator", coordinator, "--process-id", str(i)],
            env=env,
        )
        for i in range(args.num_processes)
    ]

    def stop(*_: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()

    signal.signal(signal.SIGTERM, lambda *a: (stop(), sys.exit(143)))
    try:
        codes = [None] * len(procs)
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                codes[i] = p.poll()
                if codes[i] not in (None, 0):  # one failed: the others would hang
                    stop()
            time.sleep(0.1)
    except KeyboardInterrupt:
        stop()
        raise
    finally:
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    return max(abs(c) for c in codes)


# --- worker --------------------------------------------------------------------------


def train(args: argparse.Namespace) -> int:
    """One process of the run: join the cluster, train, record, report."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import penwatch as pw
    from penwatch.diagnostics import value_and_grad_with_diagnostics

    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    index = jax.process_index()
    # jax.distributed installs a preemption notifier on SIGTERM; here SIGTERM means
    # "stop now": leave the loop, flush the monitor and shut the cluster down cleanly.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    # Every process draws its own data shard of one shared linear problem.
    truth = np.random.default_rng(0).normal(size=(args.features, 1)).astype(np.float32)
    rng = np.random.default_rng(1000 + index)

    def shard_batch() -> tuple[jax.Array, jax.Array]:
        x = rng.normal(size=(args.batch_per_process, args.features)).astype(np.float32)
        y = x @ truth + (0.1 + 0.2 * index) * rng.normal(size=(len(x), 1)).astype(np.float32)
        return (
            jax.make_array_from_process_local_data(sharded, x),
            jax.make_array_from_process_local_data(sharded, y.astype(np.float32)),
        )

    pipe = pw.pipeline([("l1", 1e-3), ("l2", 1e-2), ("elastic_net", 1e-3)])
    optimizer = optax.adam(5e-2)
    params = jax.device_put({"w": jnp.zeros((args.features, 1)), "b": jnp.zeros((1,))}, replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)
    pipe = jax.device_put(pipe, replicated)

    @jax.jit
    def step(params, opt_state, pipe, x, y):
        def terms(p):
            sq_err = jnp.square(x @ p["w"] + p["b"] - y)[:, 0]
            _, pen = pipe.compute(p["w"])
            weighted = {n: pen[f"{n}_weighted"] for n in pipe.enabled_names}
            return (jnp.mean(sq_err), weighted), (sq_err, pen)

        res = value_and_grad_with_diagnostics(terms, params, has_aux=True)
        sq_err, pen = res.aux
        updates, opt_state = optimizer.update(res.grads, opt_state, params)
        # pw.Metrics: the pipeline's packed buffers plus the diagnostics, one merge
        metrics = pen.merge(res.metrics, {"base_loss": res.values["base"]})
        return optax.apply_updates(params, updates), opt_state, metrics, sq_err

    @jax.jit
    def local_mean(a):
        return jnp.mean(a)

    sinks: list[pw.sinks.Sink] = [
        pw.sinks.Prometheus(port=args.metrics_port + index, addr=args.metrics_addr)
    ]
    if args.db:
        sinks.append(pw.sinks.SQLite(args.db))
    with pw.Monitor(
        run=args.run,
        process=index,
        sinks=sinks,
        config={"num_processes": args.num_processes, "example": "multiprocess_training"},
    ) as monitor:
        for i in range(args.steps):
            if stop.is_set():
                break
            x, y = shard_batch()
            dispatched = time.time_ns()
            params, opt_state, metrics, sq_err = step(params, opt_state, pipe, x, y)
            # Replicated results: this process's copy (no transfer, no sync). The loss is
            # this process's shard: the one per-process quantity of the step.
            local = jax.tree.map(lambda buf: buf.addressable_data(0), metrics)
            monitor.record(
                i,
                local,
                loss=local_mean(sq_err.addressable_data(0)),
                dispatched_at_ns=dispatched,
                kind="train_step",
            )
            if args.step_delay:
                stop.wait(args.step_delay)
        monitor.flush()
        final = float(local["base_loss"])
        print(f"process {index}/{jax.process_count()}: {i + 1} steps, global loss {final:.4f}")
        if args.hold:
            stop.wait(args.hold)
    jax.distributed.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.process_id is None:
        return launch(args, argv)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
