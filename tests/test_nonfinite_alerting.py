"""The non-finite alerting path (SPEC section 13): one alert per run and episode, naming
the first offender, pointing to the capsule, delivered by a real Alertmanager.

The live test starts Debian's ``prometheus`` and ``prometheus-alertmanager`` on
127.0.0.1 (the repository's rules and routing, rewritten only as ``_deploy_stack``
documents: ports, 1 s intervals, and a webhook on every receiver), trains a small model
in this process with a Prometheus sink, injects a ``log(0)`` at a known step, and waits
for the webhook that a ``http.server`` in this test serves.
"""

from __future__ import annotations

import http.server
import json
import re
import sqlite3
import subprocess
import threading
import time

import jax
import jax.numpy as jnp
import optax
import prometheus_client
import pytest
import requests
import yaml
from _deploy_stack import (
    ALERTMANAGER_CONFIG,
    PROMETHEUS_DIR,
    Managed,
    free_port,
    require_binary,
    start_alertmanager,
    start_prometheus,
    wait_until,
    write_test_alertmanager_config,
    write_test_prometheus_config,
)

import penwatch as pw
from penwatch.schema import thresholds


def _alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


# --- rules and routing, offline -------------------------------------------------------


def test_a_per_key_nonfinite_rule_fails_the_one_alert_unit_test(tmp_path):
    # The promtool case "five non-finite sources of one run" must catch the old rule,
    # which fired one alert per metric key.
    for name in ("alerts_test.yml", "recording.yml"):
        (tmp_path / name).write_text((PROMETHEUS_DIR / name).read_text())
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "PenwatchNonFinite":
                rule["expr"] = (
                    "increase(penwatch_nonfinite_total[5m]) > 0 or (penwatch_nonfinite_total"
                    " > 0 unless penwatch_nonfinite_total offset 5m)"
                )
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run(
        [require_binary("promtool"), "test", "rules", str(tmp_path / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "five non-finite sources of one run" in result.stdout + result.stderr


def test_loss_spike_rule_uses_the_shared_floor():
    expr = " ".join(_alert_rules()["PenwatchLossSpike"]["expr"].split())
    floors = re.findall(r"\)\s*<\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)", expr)
    assert [float(f) for f in floors] == [thresholds.SPIKE_MIN_DELTA], expr


def test_nonfinite_inhibits_no_dominance_or_conflict():
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for rule in config.get("inhibit_rules", []):
        if any("PenwatchNonFinite" in m for m in rule.get("source_matchers", [])):
            targets = " ".join(rule.get("target_matchers", []))
            assert "Dominance" not in targets and "Conflict" not in targets, rule


# --- the sink and the event -----------------------------------------------------------


def confidence(probs):
    return jnp.mean(jnp.sum(probs * jnp.log(probs), axis=-1))  # the offending line


def _apply(params, x):
    return jax.nn.softmax(x @ params["out"]["w"], axis=-1)


W0 = jnp.zeros((3, 4)).at[0].set(jnp.arange(4.0) * 0.01)
GOOD = (jnp.ones((2, 3)), jnp.full((2, 4), 0.25))
BAD = (jnp.array([[1e4, -1e4, 0.0], [1.0, 1.0, 1.0]]), jnp.full((2, 4), 0.25))


def _train(monitor, step, init, steps, bad_steps, on_step=None):
    state = init({"out": {"w": W0}})
    for i in range(steps):
        state, metrics = step(state, BAD if i in bad_steps else GOOD)
        monitor.record(i, metrics, pipeline="p")
        if on_step is not None:
            on_step(i)
    return state


def _build(capsule_dir):
    pipe = pw.Pipeline(name="p").add("confidence", confidence, weight=0.1)
    return pw.build_train_step(
        _apply,
        lambda p, y: (p - y) ** 2,
        pipe,
        optax.sgd(0.1),
        skip_nonfinite=True,
        nan_capsule=pw.forensics.CapsuleWriter(capsule_dir, step_fn_spec="mymodel:make_step"),
    )


def test_event_and_sink_name_the_first_offender_the_capsule_and_the_replay(tmp_path):
    init, step = _build(tmp_path / "capsules")
    events = []
    prom = pw.sinks.Prometheus(port=None)
    alert = pw.alerts.NonFinite(capsules=step.capsules)
    db = tmp_path / "store.db"
    sinks = [prom, pw.sinks.SQLite(db), pw.sinks.Callback(lambda r: None, on_event=events.append)]
    with pw.Monitor("cap", sinks=sinks, alerts=[alert]) as monitor:
        _train(monitor, step, init, 9, bad_steps={3, 4, 7})
    step.capsules.flush()
    assert [e.step for e in events] == [3, 7]
    first = events[0].attributes
    assert first["first_step"] == 3 and first["episode"] == 1 and first["nonfinite_steps"] == 1
    assert events[1].attributes["episode"] == 2 and events[1].attributes["nonfinite_steps"] == 3
    assert first["metric"] == "confidence"
    capsule = tmp_path / "capsules" / "step_00000003"
    assert first["capsule"] == str(capsule)
    assert first["replay"] == f"penwatch replay {capsule} --step-fn mymodel:make_step"
    assert f"capsule {capsule}; replay: penwatch replay" in events[0].message
    assert (capsule / "manifest.json").is_file()
    with sqlite3.connect(db) as conn:  # the store keeps them, for the dashboard
        (stored,) = conn.execute(
            "SELECT attributes FROM events WHERE kind = 'nonfinite' AND step = 3"
        ).fetchone()
    assert json.loads(stored)["replay"] == first["replay"]
    assert json.loads(stored)["capsule"] == str(capsule)
    # counts of steps and episodes, not of metric values; one first-offender series
    base = {"run": "cap", "process": "0"}
    get = prom.registry.get_sample_value
    assert get("penwatch_nonfinite_steps_total", base) == 3
    assert get("penwatch_nonfinite_episodes_total", base) == 2
    text = prom_text(prom)
    series = [ln for ln in text.splitlines() if ln.startswith("penwatch_nonfinite_first_step{")]
    assert len(series) == 1 and series[0].endswith(" 7.0"), series
    assert 'source="confidence"' in series[0] and 'kind="nan"' in series[0]


def prom_text(prom) -> str:
    return prometheus_client.generate_latest(prom.registry).decode()


def test_nonfinite_rejects_bad_capsules_option():
    with pytest.raises(ValueError, match="option 'capsules'"):
        pw.alerts.NonFinite(capsules=3)


# --- the live path: Prometheus -> Alertmanager -> webhook -----------------------------


class _Webhook(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[tuple[float, dict]] = []
        self.arrived = threading.Event()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        server.received.append((time.time(), json.loads(body)))  # type: ignore[attr-defined]
        server.arrived.set()  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.integration
def test_alertmanager_delivers_one_nonfinite_alert_to_a_webhook(tmp_path, request):
    webhook = _Webhook()
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    request.addfinalizer(webhook.shutdown)
    procs: list[Managed] = []
    request.addfinalizer(lambda: [p.stop() for p in reversed(procs)])
    prom_port, am_port = free_port(), free_port()
    am_config = write_test_alertmanager_config(
        tmp_path / "am", webhook=f"http://127.0.0.1:{webhook.server_address[1]}/alert"
    )
    procs.append(start_alertmanager(am_port, tmp_path / "am-data", tmp_path, config=am_config))

    init, step = _build(tmp_path / "capsules")
    sink = pw.sinks.Prometheus(port=0)
    monitor = pw.Monitor("webhook-run", sinks=[sink], alerts=[pw.alerts.NonFinite(
        capsules=step.capsules)])  # fmt: skip
    request.addfinalizer(monitor.close)
    config = write_test_prometheus_config(
        tmp_path / "prometheus",
        targets=[f"127.0.0.1:{sink.port}"],
        alertmanager=f"127.0.0.1:{am_port}",
    )
    procs.append(start_prometheus(config, prom_port, tmp_path))
    prom_url, am_url = f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}"

    def logs() -> str:
        return "\n".join(p.log_tail() for p in procs)

    # finite steps first, until Prometheus has scraped the run (a baseline sample)
    state = init({"out": {"w": W0}})
    i = 0

    def one_step(batch):
        nonlocal state, i
        state, metrics = step(state, batch)
        monitor.record(i, metrics, pipeline="p")
        i += 1

    def scraped():
        one_step(GOOD)
        monitor.flush(timeout=10)
        reply = requests.get(
            prom_url + "/api/v1/query",
            params={"query": 'penwatch_nonfinite_episodes_total{run="webhook-run"}'},
            timeout=5,
        ).json()
        return reply["data"]["result"]

    wait_until(scraped, timeout=60, what="the run scraped by Prometheus", on_timeout=logs)
    nan_step = i
    one_step(BAD)  # the non-finite step: a probability reaches 0, log(0) in `confidence`
    t_nan = time.time()
    one_step(BAD)  # a second non-finite step of the same episode
    for _ in range(3):
        one_step(GOOD)
    monitor.flush(timeout=10)
    assert webhook.arrived.wait(timeout=90), "no webhook within 90 s\n" + logs()
    t_hook, payload = webhook.received[0]
    latency = t_hook - t_nan
    print(f"non-finite step -> webhook: {latency:.2f} s")
    (alert,) = [a for a in payload["alerts"] if a["labels"]["alertname"] == "PenwatchNonFinite"]
    assert alert["labels"]["run"] == "webhook-run"
    assert alert["labels"]["source"] == "confidence" and alert["labels"]["kind"] == "nan"
    assert f"from step {nan_step}" in alert["annotations"]["summary"]
    assert payload["receiver"] == "penwatch-critical"
    assert latency < 60

    # Exactly one PenwatchNonFinite for the run in Alertmanager, although several metric
    # keys went non-finite on two steps.
    active = requests.get(
        am_url + "/api/v2/alerts", params={"filter": 'alertname="PenwatchNonFinite"'}, timeout=5
    ).json()
    assert len([a for a in active if a["labels"]["run"] == "webhook-run"]) == 1
    nonfinite_keys = requests.get(
        prom_url + "/api/v1/query",
        params={"query": 'penwatch_nonfinite_total{run="webhook-run"}'},
        timeout=5,
    ).json()["data"]["result"]
    assert len(nonfinite_keys) >= 3  # many keys, one alert

    # A dominance warning of the same run and process is not inhibited by it; a loss
    # spike is.
    labels = {"run": "webhook-run", "process": "0", "severity": "warning"}
    posted = [
        {"labels": {**labels, "alertname": name, "penalty": "confidence"}}
        for name in ("PenwatchGradientDominance", "PenwatchLossSpike")
    ]
    requests.post(am_url + "/api/v2/alerts", json=posted, timeout=5).raise_for_status()

    def states():
        got = requests.get(am_url + "/api/v2/alerts", timeout=5).json()
        by_name = {a["labels"]["alertname"]: a["status"] for a in got}
        if {"PenwatchGradientDominance", "PenwatchLossSpike"} <= set(by_name):
            return by_name
        return None

    status = wait_until(states, timeout=20, what="posted alerts in Alertmanager")
    assert status["PenwatchGradientDominance"]["state"] == "active", status
    assert status["PenwatchGradientDominance"]["inhibitedBy"] == []
    assert status["PenwatchLossSpike"]["state"] == "suppressed", status
