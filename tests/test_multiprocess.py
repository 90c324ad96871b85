"""A two-process JAX run scraped by the real Prometheus (SPEC section 6, multi-process).

Runs ``examples/multiprocess_training.py`` (two CPU processes joined by
``jax.distributed.initialize``, data-parallel with a cross-process gradient all-reduce,
one monitor and one Prometheus endpoint per process) and Debian's ``prometheus`` on
loopback with the repository's config rewritten to scrape both endpoints (1 s
intervals, no Alertmanager; see ``_deploy_stack.write_test_prometheus_config``). Then
reads the series back through the Prometheus HTTP API and through the dashboard's
Prometheus source (``dashboard/sources.py``), per process and aggregated.
"""

from __future__ import annotations

import math
import re
import sys

import pytest
from _deploy_stack import (
    REPO,
    Managed,
    free_port,
    free_port_block,
    prom_query,
    start_prometheus,
    subprocess_env,
    wait_until,
    write_test_prometheus_config,
)

pytestmark = pytest.mark.integration

RUN = "mp-test"
STEPS = 40
EXAMPLE = REPO / "examples" / "multiprocess_training.py"


class Run:
    def __init__(self, prom_url: str, launcher: Managed, db: str):
        self.prom_url, self.launcher, self.db = prom_url, launcher, db

    def logs(self) -> str:
        return self.launcher.log_tail(60)


@pytest.fixture(scope="module")
def run(tmp_path_factory, request) -> Run:
    tmp = tmp_path_factory.mktemp("multiprocess")
    prom_port, base = free_port(), free_port_block(2)
    procs: list[Managed] = []

    def cleanup() -> None:
        for proc in reversed(procs):
            proc.stop()

    request.addfinalizer(cleanup)
    config = write_test_prometheus_config(
        tmp / "prometheus",
        targets=[f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"],
        alertmanager=None,
    )
    procs.append(start_prometheus(config, prom_port, tmp))
    db = str(tmp / "penwatch.db")
    launcher = Managed(
        "multiprocess_training",
        [
            sys.executable,
            str(EXAMPLE),
            "--num-processes",
            "2",
            "--steps",
            str(STEPS),
            "--run",
            RUN,
            "--metrics-port",
            str(base),
            "--db",
            db,
            "--step-delay",
            "0.02",
            "--hold",
            "120",  # keep /metrics up for the scrapes; the fixture stops it
        ],
        tmp,
        env=subprocess_env(),
    )
    procs.append(launcher)
    return Run(f"http://127.0.0.1:{prom_port}", launcher, db)


def _finished(run: Run) -> dict[str, float]:
    """Wait until Prometheus has scraped the last step of both processes."""

    def done():
        if not run.launcher.alive():
            pytest.fail(f"example exited early\n{run.logs()}")
        result = prom_query(run.prom_url, f'penwatch_step{{run="{RUN}"}}')
        steps = {r["metric"]["process"]: float(r["value"][1]) for r in result}
        return steps if steps == {"0": STEPS - 1, "1": STEPS - 1} else None

    return wait_until(
        done, timeout=75, what="both processes' last step scraped", on_timeout=run.logs
    )


def test_both_processes_are_scraped_with_process_labels(run):
    steps = _finished(run)
    assert steps == {"0": STEPS - 1, "1": STEPS - 1}
    # Two endpoints, one per process, each carrying only its own process label.
    result = prom_query(run.prom_url, f'penwatch_step{{run="{RUN}"}}')
    by_instance = {r["metric"]["instance"]: r["metric"]["process"] for r in result}
    assert len(by_instance) == 2 and sorted(by_instance.values()) == ["0", "1"], by_instance
    counted = prom_query(run.prom_url, f'count by (run) (penwatch_run_info{{run="{RUN}"}})')
    assert float(counted[0]["value"][1]) == 2
    info = prom_query(run.prom_url, f'penwatch_run_info{{run="{RUN}"}}')
    assert {r["metric"]["devices"] for r in info} == {"2"}  # the global device count


def test_data_parallel_processes_share_parameters_but_not_data(run):
    _finished(run)
    # Parameters are replicated and updated by one all-reduced gradient, so the
    # penalties of the weights agree across processes to float32 precision...
    values = prom_query(run.prom_url, f'penwatch_penalty_value{{run="{RUN}"}}')
    by_penalty: dict[str, dict[str, float]] = {}
    for r in values:
        by_penalty.setdefault(r["metric"]["penalty"], {})[r["metric"]["process"]] = float(
            r["value"][1]
        )
    assert set(by_penalty) >= {"l1", "l2", "elastic_net"}, by_penalty
    for penalty, per_process in by_penalty.items():
        assert set(per_process) == {"0", "1"}, (penalty, per_process)
        assert per_process["0"] > 0
        assert math.isclose(per_process["0"], per_process["1"], rel_tol=1e-6), penalty
    # ...while each process's task loss is that of its own (noisier) data shard.
    loss = prom_query(run.prom_url, f'penwatch_loss{{run="{RUN}"}}')
    per_process = {r["metric"]["process"]: float(r["value"][1]) for r in loss}
    assert set(per_process) == {"0", "1"}
    assert not math.isclose(per_process["0"], per_process["1"], rel_tol=1e-3), per_process
    # Both processes printed the same global (all-reduced) loss at the end.
    printed = re.findall(r"process (\d)/2: \d+ steps, global loss ([\d.]+)", run.logs())
    assert len(printed) == 2, run.logs()
    assert printed[0][1] == printed[1][1], printed


def test_gradient_shares_are_reported_per_process(run):
    _finished(run)
    shares = prom_query(run.prom_url, f'penwatch_penalty_grad_share{{run="{RUN}"}}')
    processes = {r["metric"]["process"] for r in shares}
    assert processes == {"0", "1"}, shares
    # Shares of all terms (task loss included) sum to 1 in every process.
    total = prom_query(
        run.prom_url, f'sum by (process) (penwatch_penalty_grad_share{{run="{RUN}"}})'
    )
    for r in total:
        assert math.isclose(float(r["value"][1]), 1.0, abs_tol=1e-4), total


def test_dashboard_prometheus_source_shows_both_processes_and_their_aggregate(run):
    from penwatch.dashboard.sources import Config, make_source

    _finished(run)
    # The path the app takes with PENWATCH_PROMETHEUS_URL set.
    config = Config.from_env([], {"PENWATCH_PROMETHEUS_URL": run.prom_url})
    source = make_source(config)
    assert type(source).__name__ == "PrometheusSource"
    (choice,) = [c for c in source.runs() if c.name == RUN]
    assert choice.processes == (0, 1)
    assert choice.last_step == STEPS - 1

    loss = {
        r["metric"]["process"]: float(r["value"][1])
        for r in prom_query(run.prom_url, f'penwatch_loss{{run="{RUN}"}}')
    }
    per_process = {p: source.snapshot(RUN, p) for p in (0, 1)}
    for p, snap in per_process.items():
        assert snap.headline.step == STEPS - 1
        assert math.isclose(snap.headline.loss, loss[str(p)], rel_tol=1e-9), (p, loss)
        assert set(snap.shares["penalty"]) >= {"l1", "l2", "elastic_net"}

    # Range charts sample at the source's resolution (lookback / max_points, 9 s by
    # default), so a run only seconds old may have no point yet: refresh as the app does.
    def drawn():
        snap = source.snapshot(RUN, None)
        return snap if not snap.contributions.empty else None

    aggregate = wait_until(
        drawn,
        timeout=30,
        what="the dashboard's aggregate contributions",
    )
    assert aggregate.processes == (0, 1)
    assert aggregate.headline.step == STEPS - 1
    # The aggregate loss is the mean over processes: the global (all-shard) loss.
    assert math.isclose(aggregate.headline.loss, (loss["0"] + loss["1"]) / 2, rel_tol=1e-9)
    assert not aggregate.contributions.empty
    assert set(aggregate.contributions["penalty"]) >= {"l1", "l2", "elastic_net"}
    assert {"base", "l1", "l2", "elastic_net"} <= set(aggregate.terms["term"])
    assert aggregate.grad_wrt == "params"


def test_both_processes_share_one_sqlite_store(run):
    import sqlite3

    _finished(run)  # the example flushes its monitor before holding the endpoints open
    with sqlite3.connect(f"file:{run.db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT r.process, count(s.id), max(s.step) FROM runs r "
            "JOIN steps s ON s.run_id = r.id WHERE r.name = ? GROUP BY r.process",
            (RUN,),
        ).fetchall()
    assert sorted(rows) == [(0, STEPS, STEPS - 1), (1, STEPS, STEPS - 1)], rows
