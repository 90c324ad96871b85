"""The deployment configuration validates with the real tools (SPEC section 8).

``docker-compose config`` (Debian's docker-compose; config only, no Docker engine),
``promtool check config``, ``promtool check rules``, ``promtool test rules`` and
``amtool check-config``, plus the cross-file consistency the tools cannot see (ports,
service names, the alert contract of SPEC section 6).
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from _deploy_stack import ALERTMANAGER_CONFIG, DEPLOY, PROMETHEUS_DIR, REPO, require_binary

from penwatch.schema import thresholds

COMPOSE_FILE = REPO / "docker-compose.yml"
STACK = {"trainer", "prometheus", "alertmanager", "otel-collector", "jaeger", "dashboard"}
REQUIRED_ALERTS = {
    "PenwatchNonFinite": "penwatch_nonfinite_first_step",
    "PenwatchGradientDominance": "penwatch_penalty_grad_share",
    "PenwatchGradientConflict": "penwatch_penalty_grad_cosine",
    "PenwatchTrainingStalled": "penwatch_last_step_timestamp_seconds",
    "PenwatchTelemetryDropping": "penwatch_telemetry_dropped_total",
    "PenwatchLossSpike": "penwatch_loss",
    "PenwatchGradientTugOfWar": "penwatch_penalty_grad_cosine",
    "PenwatchActivityCollapse": "penwatch_capture_dead_fraction",
    "PenwatchDeadTerm": "penwatch_penalty_grad_norm",
    "PenwatchFirstStepShare": "penwatch_penalty_grad_share",
}


def _run(argv: list[str], *, cwd=REPO) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert result.returncode == 0, (
        f"{' '.join(argv)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as docker-compose resolves it (all profiles)."""
    binary = require_binary("docker-compose")
    out = _run([binary, "-f", str(COMPOSE_FILE), "--profile", "grafana", "config"]).stdout
    return yaml.safe_load(out)


def _alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


# --- the tools ------------------------------------------------------------------------


def test_docker_compose_config_validates(compose):
    assert set(compose["services"]) >= STACK, set(compose["services"])
    # Quiet mode must also pass (exit status is the validation verdict).
    _run([require_binary("docker-compose"), "-f", str(COMPOSE_FILE), "config", "-q"])


def test_promtool_check_config():
    out = _run(
        [require_binary("promtool"), "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR
    )
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_check_config_from_repo_root():
    # rule_files are relative to the config file, wherever promtool is started from.
    path = PROMETHEUS_DIR / "prometheus.yml"
    out = _run([require_binary("promtool"), "check", "config", str(path)])
    assert "2 rule files found" in out.stdout + out.stderr


def test_promtool_check_rules():
    out = _run(
        [
            require_binary("promtool"),
            "check",
            "rules",
            str(PROMETHEUS_DIR / "alerts.yml"),
            str(PROMETHEUS_DIR / "recording.yml"),
        ]
    )
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_test_rules():
    out = _run(
        [require_binary("promtool"), "test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml")]
    )
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_test_rules_detects_a_broken_rule(tmp_path):
    # The unit tests can fail: drop the new-series branch of PenwatchNonFinite and the
    # `penalty!="base"` filter of PenwatchGradientDominance, and promtool must object.
    for name in ("alerts_test.yml", "recording.yml"):
        (tmp_path / name).write_text((PROMETHEUS_DIR / name).read_text())
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "PenwatchNonFinite":
                rule["expr"] = (
                    "penwatch_nonfinite_first_step and on (run, process) "
                    "increase(penwatch_nonfinite_episodes_total[5m]) > 0"
                )
            if rule.get("alert") == "PenwatchGradientDominance":
                rule["expr"] = "penwatch_penalty_grad_share > 0.5"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run(
        [require_binary("promtool"), "test", "rules", str(tmp_path / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    report = result.stdout + result.stderr
    assert "appears already at 1" in report
    assert "never for the base term" in report


def test_amtool_check_config():
    out = _run([require_binary("amtool"), "check-config", str(ALERTMANAGER_CONFIG)])
    assert "SUCCESS" in out.stdout + out.stderr


# --- the alert contract (SPEC section 6) ---------------------------------------------


def test_every_monitor_alert_has_a_rule_twin_with_labels_and_annotations():
    rules = _alert_rules()
    assert set(REQUIRED_ALERTS) <= set(rules), set(rules)
    for name, metric in REQUIRED_ALERTS.items():
        rule = rules[name]
        assert metric in rule["expr"], (name, rule["expr"])
        assert rule["labels"]["severity"] in {"critical", "warning"}
        for field in ("summary", "description"):
            text = rule["annotations"][field]
            assert "$labels.run" in text and "$labels.process" in text, (name, field)
    for name in (
        "PenwatchGradientDominance",
        "PenwatchGradientConflict",
        "PenwatchGradientTugOfWar",
        "PenwatchDeadTerm",
        "PenwatchFirstStepShare",
    ):
        assert "$labels.penalty" in rules[name]["annotations"]["summary"]


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    firing, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    rules = set(_alert_rules())
    assert rules <= firing, rules - firing
    assert rules <= quiet, rules - quiet


# The rules repeat penwatch.schema.thresholds in PromQL: (alert, metric, comparison, name).
RULE_THRESHOLDS = [
    ("PenwatchGradientDominance", "penwatch_penalty_grad_share", ">", "DOMINANCE_SHARE"),
    ("PenwatchGradientConflict", "penwatch_penalty_grad_cosine", "<", "CONFLICT_COSINE"),
    ("PenwatchLossSpike", None, ">", "SPIKE_ZSCORE"),
    ("PenwatchGradientTugOfWar", "penwatch_penalty_grad_cosine", "<", "TUG_COSINE"),
    ("PenwatchGradientTugOfWar", None, ">=", "TUG_RATIO"),
    ("PenwatchActivityCollapse", "penwatch_capture_dead_fraction", ">", "COLLAPSE_DEAD_FRACTION"),
    ("PenwatchFirstStepShare", "penwatch_penalty_grad_share", ">", "LINT_SHARE"),
]
_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"


def _rule_threshold(expr: str, metric: str | None, op: str) -> float:
    """The number a rule compares with: ``metric{...} OP N``, or the last ``OP N``."""
    expr = " ".join(expr.split())
    if metric is not None:
        found = re.findall(
            re.escape(metric) + r"(?:\{[^}]*\})?\s*" + re.escape(op) + r"\s*" + _NUMBER, expr
        )
    else:
        found = re.findall(r"\)\s*" + re.escape(op) + r"\s*" + _NUMBER + r"\s*$", expr)
    assert len(found) == 1, f"cannot find one '{op} N' comparison in {expr!r}"
    return float(found[0])


@pytest.mark.parametrize(("alert", "metric", "op", "name"), RULE_THRESHOLDS)
def test_alert_rules_use_the_shared_thresholds(alert, metric, op, name):
    rule = _alert_rules()[alert]
    in_rule = _rule_threshold(rule["expr"], metric, op)
    shared = getattr(thresholds, name)
    assert in_rule == shared, (
        f"deploy/prometheus/alerts.yml rule {alert} compares with {in_rule:g}, but "
        f"penwatch.schema.thresholds.{name} is {shared:g}: change one to match the other"
    )


def test_rule_threshold_parser_sees_a_changed_number():
    rule = _alert_rules()["PenwatchGradientDominance"]
    changed = rule["expr"].replace(f"> {thresholds.DOMINANCE_SHARE:g}", "> 0.7")
    assert changed != rule["expr"]
    assert _rule_threshold(changed, "penwatch_penalty_grad_share", ">") == 0.7
    with pytest.raises(AssertionError, match="cannot find"):
        _rule_threshold("penwatch_penalty_grad_share > bool 1", "penwatch_penalty_grad_share", "<")


# --- cross-file consistency ------------------------------------------------------------


def _port_of(target: str) -> tuple[str, int]:
    host, port = target.rsplit(":", 1)
    return host, int(port)


def test_prometheus_scrapes_the_trainer_and_alerts_the_alertmanager(compose):
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "penwatch"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = _port_of(target)
    trainer = compose["services"][host]
    command = trainer["command"]
    assert "--no-dashboard" in command
    assert command[command.index("--metrics-port") + 1] == str(port)
    (am_target,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    am_host, am_port = _port_of(am_target)
    assert am_host == "alertmanager" and am_port == 9093
    # Prometheus in compose mounts exactly these files.
    prometheus = compose["services"]["prometheus"]
    assert any(str(PROMETHEUS_DIR) in str(v) for v in prometheus["volumes"]), prometheus


def test_compose_services_are_pinned_checked_and_persistent(compose):
    services = compose["services"]
    for name, service in services.items():
        image = service["image"]
        if "build" in service:
            assert service["build"]["dockerfile"] == "deploy/Dockerfile"
            continue
        tag = image.rsplit(":", 1)[-1]
        assert ":" in image and tag != "latest" and re.search(r"\d+\.\d+", tag), image
        if name != "otel-collector":  # scratch image: no shell or client to probe with
            assert "healthcheck" in service, name
    for name in ("trainer", "dashboard", "prometheus", "alertmanager"):
        assert "healthcheck" in services[name], name
    named = set(compose.get("volumes", {}))
    for name in ("trainer", "prometheus", "alertmanager"):
        sources = {
            str(v).split(":")[0] if isinstance(v, str) else v["source"]
            for v in services[name]["volumes"]
        }
        assert sources & named, (name, sources, named)
    dashboard = services["dashboard"]
    assert dashboard["environment"]["PENWATCH_PROMETHEUS_URL"] == "http://prometheus:9090"
    assert (REPO / "deploy" / "Dockerfile").is_file()
    # The image runs what the repository holds: the dashboard app and the demo CLI.
    assert "dashboard/app.py" in dashboard["command"]
    assert (REPO / "dashboard" / "app.py").is_file()
    assert services["trainer"]["command"][0] == "demo"
    assert services["trainer"]["environment"]["PENWATCH_METRICS_ADDR"] == "0.0.0.0"


def test_otel_collector_pipeline_forwards_otlp_to_jaeger(compose):
    config = yaml.safe_load((DEPLOY / "otel-collector" / "config.yaml").read_text())
    (traces,) = [p for n, p in config["service"]["pipelines"].items() if n.startswith("traces")]
    for kind in ("receivers", "processors", "exporters"):
        for component in traces[kind]:
            assert component in config[kind], (kind, component)
    assert "otlp" in traces["receivers"]
    jaeger = [config["exporters"][e] for e in traces["exporters"] if e.startswith("otlp")]
    assert jaeger and jaeger[0]["endpoint"] == "jaeger:4317"
    trainer_env = compose["services"]["trainer"]["environment"]
    assert trainer_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    ports = {_container_port(p) for p in compose["services"]["otel-collector"]["ports"]}
    assert {4317, 4318} <= ports, ports


def _container_port(mapping: str | dict) -> int:
    """Container side of a compose port mapping (``127.0.0.1:4317:4317/tcp`` -> 4317)."""
    if isinstance(mapping, dict):
        return int(mapping["target"])
    return int(str(mapping).split("/")[0].rsplit(":", 1)[-1])


def test_dockerfile_installs_the_project_and_runs_the_cli():
    text = (DEPLOY / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim(-\w+)?", base), base
    # the extras the image's two commands need (SPEC section 14): OTLP export, Streamlit
    assert re.search(r"^RUN pip install '\.\[dashboard,otlp\]'", text, flags=re.MULTILINE)
    assert 'ENTRYPOINT ["penwatch"]' in text
    assert '"--no-dashboard"' in text
    # The build context is filtered by the root .dockerignore (docker-compose v1 reads
    # only that one), so the image never receives .venv or stores.
    ignore = (DEPLOY.parent / ".dockerignore").read_text().split()
    assert {"**", "!penwatch/**", "!dashboard/**", "!pyproject.toml"} <= set(ignore)
