"""The repository's Prometheus + Alertmanager configuration, run for real (SPEC section 8).

Starts Debian's ``prometheus`` and ``prometheus-alertmanager`` on 127.0.0.1 with free
ports, and a ``penwatch demo`` training process that injects a NaN. The Prometheus
config and rules are the repository's own, rewritten into a temporary directory by
``_deploy_stack.write_test_prometheus_config``: the ``penwatch`` job's target and the
Alertmanager target point at this test's ports, the scrape and evaluation intervals
become 1 s, and every ``for:`` is capped at 1 s (the rules' expressions, labels and
annotations are unchanged). Alertmanager runs the repository's config unchanged.
Everything is asserted through the two servers' HTTP APIs.
"""

from __future__ import annotations

import pytest
import requests
from _deploy_stack import (
    PENWATCH_CLI,
    Managed,
    free_port,
    prom_query,
    start_alertmanager,
    start_prometheus,
    subprocess_env,
    wait_until,
    write_test_prometheus_config,
)

pytestmark = pytest.mark.integration

RUN = "live-nan"
NAN_STEP = 8

PENALTY_METRICS = (
    "penwatch_penalty_value",
    "penwatch_penalty_weighted_value",
    "penwatch_penalty_weight",
)
RUN_METRICS = (
    "penwatch_step",
    "penwatch_last_step_timestamp_seconds",
    "penwatch_loss",
    "penwatch_pipeline_value",
    "penwatch_pipeline_compute_duration_seconds_bucket",
    "penwatch_run_info",
)


class Stack:
    def __init__(self, prom_url: str, am_url: str, procs: dict[str, Managed]):
        self.prom_url, self.am_url, self.procs = prom_url, am_url, procs

    def logs(self) -> str:
        return "\n".join(p.log_tail() for p in self.procs.values())


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request) -> Stack:
    tmp = tmp_path_factory.mktemp("prometheus_live")
    prom_port, am_port, metrics_port = free_port(), free_port(), free_port()
    procs: dict[str, Managed] = {}

    def cleanup() -> None:
        for proc in reversed(list(procs.values())):
            proc.stop()

    request.addfinalizer(cleanup)
    procs["alertmanager"] = start_alertmanager(am_port, tmp / "alertmanager", tmp)
    config = write_test_prometheus_config(
        tmp / "prometheus",
        targets=[f"127.0.0.1:{metrics_port}"],
        alertmanager=f"127.0.0.1:{am_port}",
    )
    procs["prometheus"] = start_prometheus(config, prom_port, tmp)
    assert PENWATCH_CLI.exists(), f"the penwatch CLI is not installed at {PENWATCH_CLI}"
    procs["trainer"] = Managed(
        "trainer",
        [
            str(PENWATCH_CLI),
            "demo",
            "--no-dashboard",
            "--run",
            RUN,
            "--metrics-port",
            str(metrics_port),
            "--inject-nan-at",
            str(NAN_STEP),
            "--steps",
            "100000",  # runs until the fixture stops it
            "--step-delay",
            "0.05",
            "--db",
            str(tmp / "penwatch.db"),
        ],
        tmp,
        env=subprocess_env(),
    )
    return Stack(f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}", procs)


def _trainer_alive(stack: Stack) -> None:
    trainer = stack.procs["trainer"]
    if not trainer.alive():
        pytest.fail(f"penwatch demo exited with {trainer.proc.returncode}\n{trainer.log_tail()}")


def test_series_are_scraped_with_spec_names_and_labels(stack):
    def scraped():
        _trainer_alive(stack)
        return prom_query(stack.prom_url, f'penwatch_step{{run="{RUN}"}} > 2')

    (step,) = wait_until(scraped, timeout=60, what="penwatch_step scraped", on_timeout=stack.logs)
    assert step["metric"]["job"] == "penwatch"
    assert step["metric"]["process"] == "0"
    for name in RUN_METRICS:
        result = wait_until(
            lambda n=name: prom_query(stack.prom_url, f'{n}{{run="{RUN}"}}'),
            timeout=10,
            what=f"{name} scraped",
            on_timeout=stack.logs,
        )
        assert all(r["metric"]["process"] == "0" for r in result), (name, result)
    for name in PENALTY_METRICS:
        result = prom_query(stack.prom_url, f'{name}{{run="{RUN}"}}')
        assert len(result) >= 2, (name, result)  # the demo has several penalties
        for series in result:
            labels = series["metric"]
            assert {"run", "process", "pipeline", "penalty"} <= set(labels), labels
    (info,) = prom_query(stack.prom_url, f'penwatch_run_info{{run="{RUN}"}}')
    assert {"version", "backend", "devices"} <= set(info["metric"])
    assert info["value"][1] == "1"
    # Steps advance between scrapes (the series is live, not a one-off).
    first = float(step["value"][1])
    wait_until(
        lambda: (
            float(prom_query(stack.prom_url, f'penwatch_step{{run="{RUN}"}}')[0]["value"][1])
            > first
        ),
        timeout=10,
        what="penwatch_step to advance",
    )


def test_nan_alert_fires_in_prometheus(stack):
    def firing():
        _trainer_alive(stack)
        alerts = requests.get(stack.prom_url + "/api/v1/alerts", timeout=5).json()["data"]
        return [
            a
            for a in alerts["alerts"]
            if a["labels"]["alertname"] == "PenwatchNonFinite"
            and a["labels"].get("run") == RUN
            and a["state"] == "firing"
        ]

    alerts = wait_until(
        firing, timeout=60, what="PenwatchNonFinite firing in Prometheus", on_timeout=stack.logs
    )
    labels = alerts[0]["labels"]
    assert labels["severity"] == "critical"
    assert labels["process"] == "0"
    assert labels["kind"] in {"nan", "inf"}
    assert labels["source"]  # the first metric key that went non-finite
    assert labels["leaf"]  # the first non-finite leaf ("none" when there is none)
    assert len(alerts) == 1  # one alert per run and episode, not one per metric key
    assert RUN in alerts[0]["annotations"]["summary"]
    # The counter behind it is a real detection count.
    detections = prom_query(stack.prom_url, f'penwatch_nonfinite_total{{run="{RUN}"}}')
    assert detections and all(float(d["value"][1]) >= 1 for d in detections)


def test_alertmanager_receives_the_alert(stack):
    def received():
        reply = requests.get(
            stack.am_url + "/api/v2/alerts",
            params={"filter": ['alertname="PenwatchNonFinite"', f'run="{RUN}"']},
            timeout=5,
        )
        reply.raise_for_status()
        return reply.json()

    alerts = wait_until(
        received, timeout=60, what="PenwatchNonFinite in Alertmanager", on_timeout=stack.logs
    )
    alert = alerts[0]
    assert alert["status"]["state"] == "active"
    assert alert["labels"]["process"] == "0"
    # The repository's routing tree sends critical alerts to the critical receiver.
    assert [r["name"] for r in alert["receivers"]] == ["penwatch-critical"]
    assert RUN in alert["annotations"]["description"]


def test_every_rule_evaluates_without_error(stack):
    # Runtime PromQL errors (e.g. many-to-many matching in `or` / `unless`) only show
    # when the rules meet real series.
    def evaluated():
        groups = requests.get(stack.prom_url + "/api/v1/rules", timeout=5).json()["data"]
        rules = [r for g in groups["groups"] for r in g["rules"]]
        return rules if all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    rules = wait_until(evaluated, timeout=15, what="every rule evaluated once")
    assert {r["name"] for r in rules if r["type"] == "alerting"} >= {
        "PenwatchNonFinite",
        "PenwatchGradientDominance",
        "PenwatchGradientConflict",
        "PenwatchTrainingStalled",
        "PenwatchTelemetryDropping",
        "PenwatchLossSpike",
    }
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
