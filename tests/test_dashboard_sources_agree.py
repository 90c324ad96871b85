"""Both dashboard sources, one real run: a real Prometheus after the run has ended.

A training process (a ``pw.Monitor`` with the SQLite and Prometheus sinks and the
NonFinite and GradientDominance alerts) records synthetic steps with a NaN episode, a
dominating term and a bonus (negative) penalty, waits until Debian's ``prometheus``
(scraping every second) has seen its last step, and exits. Its series are then stale —
an instant query no longer returns them — yet the Prometheus source lists the run and
draws it, and it yields the same figures as the SQLite source for the same run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from _deploy_stack import free_port, prom_query, start_prometheus, subprocess_env, wait_until
from penwatch.dashboard.prom_source import PrometheusSource
from penwatch.dashboard.sources import SQLiteSource

pytestmark = pytest.mark.integration

RUN = "agree-run"
FIRST, STEPS = 2000, 40
NAN_AT = (2020, 2021)

TRAINER = textwrap.dedent(
    """
    import pathlib, sys, time
    import penwatch as pw
    from penwatch.store._synthetic import synthetic_values

    db, port, marker = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
    monitor = pw.Monitor(
        run="{run}",
        sinks=[pw.sinks.SQLite(db), pw.sinks.Prometheus(port=port)],
        alerts=[pw.alerts.NonFinite(), pw.alerts.GradientDominance(patience=5)],
    )
    for step in range({first}, {first} + {steps}):
        values = synthetic_values(step, nan=step in {nan_at})
        # entropy is a bonus: a negative weighted value, the total adjusted to match
        bonus = values["entropy_weighted"]
        values["entropy_weighted"] = -bonus
        values["total"] = values["total"] - 2 * bonus
        monitor.record(step, values, loss=values["base_loss"])
        time.sleep(0.2)  # several scrapes (1 s) over the run
    monitor.flush()
    marker.write_text("recorded")
    while not (marker.parent / "stop").exists():  # until Prometheus has the last step
        time.sleep(0.05)
    monitor.close()
    """
).format(run=RUN, first=FIRST, steps=STEPS, nan_at=NAN_AT)


def _config(path, target: str):
    path.mkdir(parents=True, exist_ok=True)
    config = path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: penwatch\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    return config


@pytest.fixture(scope="module")
def ended_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agree")
    metrics_port, prom_port = free_port(), free_port()
    prom = start_prometheus(
        _config(tmp / "prometheus", f"127.0.0.1:{metrics_port}"), prom_port, tmp
    )
    url = f"http://127.0.0.1:{prom_port}"
    db, marker = tmp / "run.db", tmp / "recorded"
    script = tmp / "trainer.py"
    script.write_text(TRAINER)
    trainer = subprocess.Popen(
        [sys.executable, str(script), str(db), str(metrics_port), str(marker)],
        env=subprocess_env(JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(marker.exists, timeout=120, what="the trainer recorded every step")
        last = FIRST + STEPS - 1
        wait_until(
            lambda: prom_query(url, f'penwatch_step{{run="{RUN}"}} == {last}'),
            timeout=30,
            what="Prometheus scraped the last step",
        )
        (tmp / "stop").write_text("")
        assert trainer.wait(60) == 0, trainer.stdout.read()
        # the run has ended: its series go stale and an instant query no longer sees them
        wait_until(
            lambda: not prom_query(url, f'penwatch_step{{run="{RUN}"}}'),
            timeout=30,
            what="the ended run's series went stale",
        )
        yield url, db
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(10)
        prom.stop()


def test_prometheus_lists_and_draws_an_ended_run(ended_run):
    url, _ = ended_run
    source = PrometheusSource(url, lookback=600, max_points=600)
    (run,) = source.runs()
    assert (run.name, run.last_step, run.status) == (RUN, FIRST + STEPS - 1, "running")
    idle = PrometheusSource(url, lookback=600, max_points=600, stale_after=0.5)
    assert idle.runs()[0].status == "idle"
    snap = source.snapshot(RUN, None)
    assert snap.headline.step == FIRST + STEPS - 1
    assert set(snap.contributions["penalty"]) == {"l1", "l2", "entropy", "orthogonality"}
    assert set(snap.losses["series"]) == {"base loss", "total penalty"}
    assert snap.losses["step"].max() == FIRST + STEPS - 1
    assert snap.grad_wrt == "params" and len(snap.grads)


def test_both_sources_yield_the_same_figures(ended_run):
    url, db = ended_run
    prom = PrometheusSource(url, lookback=600, max_points=600).snapshot(RUN, None)
    sql = SQLiteSource(db).snapshot(RUN, None)
    ph, sh = prom.headline, sql.headline
    assert ph.step == sh.step == FIRST + STEPS - 1
    assert sql.headline.status == "finished"
    assert ph.loss == pytest.approx(sh.loss, rel=1e-6)
    assert ph.total == pytest.approx(sh.total, rel=1e-6)
    assert ph.penalty_share == pytest.approx(sh.penalty_share, rel=1e-6)
    # signed shares: the bonus term is negative, magnitudes sum to one
    ps, ss = (s.shares.set_index("penalty")["share"].sort_index() for s in (prom, sql))
    assert list(ps.index) == list(ss.index)
    assert ps.to_numpy() == pytest.approx(ss.to_numpy(), rel=1e-6)
    assert ss["entropy"] < 0 and abs(ss).sum() == pytest.approx(1.0)
    pt, st_ = (s.terms.set_index("term").sort_index() for s in (prom, sql))
    assert list(pt.index) == list(st_.index)
    assert list(pt["status"]) == list(st_["status"]) and st_.loc["l2", "status"] == "dominating"
    for q in ("grad_share", "grad_cosine", "grad_norm"):
        assert pt[q].to_numpy() == pytest.approx(st_[q].to_numpy(), rel=1e-6), q
    # non-finite: SQLite knows each step; Prometheus locates them by scrapes (1 s here,
    # 5 steps), approximately, and says it is not exact
    assert (sql.nonfinite.steps, sql.nonfinite.episodes, sql.nonfinite.exact) == (2, 1, True)
    assert sql.nonfinite.first_step == NAN_AT[0]
    pn = prom.nonfinite
    assert pn.episodes == 1 and 1 <= pn.steps <= 2 and not pn.exact
    assert abs(pn.first_step - NAN_AT[0]) <= 10
    assert ph.alerts == sh.alerts == 2  # one NonFinite episode, one GradientDominance
    assert sorted(prom.events["name"]) == sorted(sql.events["name"])
    assert [a.what for a in prom.attention] == [a.what for a in sql.attention]
