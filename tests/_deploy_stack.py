"""Helpers for the deployment tests: real Debian binaries on loopback, bounded waits.

Used by ``test_deploy_config.py``, ``test_prometheus_live.py`` and
``test_multiprocess.py``. Every process started here runs in its own session (process
group) and is killed as a group by :meth:`Managed.stop`, which the tests' fixtures call
from finalizers. Nothing sleeps for a fixed time where an endpoint can be polled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
PENWATCH_CLI = Path(sys.executable).with_name("penwatch")

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_binary(name: str) -> str:
    """Path of a system binary; FAIL under CI=true when missing, skip loudly otherwise."""
    path = shutil.which(name)
    if path is None:
        message = (
            f"required binary {name!r} is not on PATH. It comes from Debian's packages "
            "prometheus / prometheus-alertmanager / docker-compose, installed by "
            "`make system-deps` when running as root."
        )
        if IN_CI:
            pytest.fail(message + " (CI=true: missing tools are a failure)")
        pytest.skip("MISSING SYSTEM DEPENDENCY: " + message)
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(n: int, *, attempts: int = 50) -> int:
    """A base port ``p`` such that ``p .. p+n-1`` are all free on 127.0.0.1."""
    for _ in range(attempts):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for k in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports found")


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    on_timeout: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except (requests.RequestException, ValueError, KeyError) as exc:
            value, last_error = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout else ""
            pytest.fail(
                f"timed out after {timeout:.0f}s waiting for {what}"
                + (f" (last error: {last_error!r})" if last_error else "")
                + (f"\n{detail}" if detail else "")
            )
        time.sleep(interval)


class Managed:
    """A subprocess in its own process group, with its output captured to a file."""

    def __init__(
        self, name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None
    ):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return f"--- last {n} lines of {self.name} ({self.log_path}) ---\n" + "\n".join(lines[-n:])

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit within {timeout:.0f}s\n{self.log_tail()}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL it after ``grace`` seconds."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=grace)
        # Children that outlived their leader (same group) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


# --- configuration rewriting --------------------------------------------------------


def _seconds(duration: str) -> float:
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total, number = 0.0, ""
    i = 0
    while i < len(duration):
        ch = duration[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = duration[i : i + 2] if duration[i : i + 2] == "ms" else ch
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    return total


def write_test_prometheus_config(
    dest: Path,
    *,
    targets: Sequence[str],
    alertmanager: str | None,
    for_cap: str = "1s",
) -> Path:
    """Rewrite the repository's Prometheus config and rules for a loopback test run.

    The rewrite is structural (YAML in, YAML out) and changes only:
      * ``global.scrape_interval`` and ``evaluation_interval`` -> 1s;
      * the ``penwatch`` job's static targets -> ``targets``; other jobs are dropped
        (they point at compose service names);
      * the Alertmanager target -> ``alertmanager`` (or no alerting section);
      * every alerting rule's ``for:`` -> at most ``for_cap`` (minutes are too long for
        a test; expressions, labels and annotations are kept byte for byte).
    Returns the path of the rewritten ``prometheus.yml``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "penwatch"]
    assert len(jobs) == 1, "prometheus.yml must have exactly one `penwatch` job"
    jobs[0]["static_configs"] = [{"targets": list(targets)}]
    config["scrape_configs"] = jobs
    if alertmanager is None:
        config.pop("alerting", None)
    else:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    for rule_file in config["rule_files"]:
        rules = yaml.safe_load((PROMETHEUS_DIR / rule_file).read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule and _seconds(rule["for"]) > _seconds(for_cap):
                    rule["for"] = for_cap
        (dest / rule_file).write_text(yaml.safe_dump(rules, sort_keys=False))
    path = dest / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_test_alertmanager_config(dest: Path, *, webhook: str) -> Path:
    """The repository's Alertmanager config with a webhook on every receiver.

    Only ``webhook_configs`` are added (routes, grouping, inhibit rules unchanged).
    """
    dest.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for receiver in config["receivers"]:
        receiver["webhook_configs"] = [{"url": webhook, "send_resolved": False}]
    path = dest / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- servers --------------------------------------------------------------------------


def start_prometheus(config: Path, port: int, log_dir: Path) -> Managed:
    """Debian's ``prometheus`` on 127.0.0.1:``port``, ready when /-/ready answers."""
    binary = require_binary("prometheus")
    proc = Managed(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={config.parent / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ],
        log_dir,
    )
    return _ready(proc, port)


def start_alertmanager(
    port: int, workdir: Path, log_dir: Path, *, config: Path = ALERTMANAGER_CONFIG
) -> Managed:
    """Debian's ``prometheus-alertmanager`` with the repository's config (or ``config``,
    e.g. from :func:`write_test_alertmanager_config`), no clustering."""
    binary = require_binary("prometheus-alertmanager")
    workdir.mkdir(parents=True, exist_ok=True)
    proc = Managed(
        "alertmanager",
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={workdir}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ],
        log_dir,
    )
    return _ready(proc, port)


def _ready(proc: Managed, port: int) -> Managed:
    """Wait (bounded) until a Prometheus-family server answers ``/-/ready``."""
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: proc.alive() and requests.get(url + "/-/ready", timeout=1).ok,
        timeout=30,
        what=f"{proc.name} /-/ready",
        on_timeout=proc.log_tail,
    )
    return proc


def prom_query(base_url: str, expr: str) -> list[dict[str, Any]]:
    """Instant query through the HTTP API; the ``result`` vector."""
    reply = requests.get(base_url + "/api/v1/query", params={"query": expr}, timeout=5)
    reply.raise_for_status()
    body = reply.json()
    if body["status"] != "success":
        raise ValueError(f"query {expr!r} failed: {body}")
    return body["data"]["result"]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child training process: CPU JAX, no OTLP export."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", OTEL_TRACES_EXPORTER="none")
    env.update(extra)
    return env
