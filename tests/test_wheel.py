"""The package as a new user gets it (SPEC section 14): build the wheel, install it into a
fresh virtual environment without extras (``import penwatch`` works, Streamlit is absent,
a feature needing an extra names it), then add ``[dashboard]`` as that message says
(``penwatch dashboard`` answers HTTP 200 and renders in headless Chromium).

Slow (a virtual environment; pip uses its cache and the configured indexes); marked
``integration``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import zipfile

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.concurrent]

CHROMIUM = "/usr/bin/chromium"
PIP_TIMEOUT = 900


def _run(args: list[str], *, timeout: float = PIP_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _clean_env() -> dict[str, str]:
    """The environment without this checkout on the path (the venv must use the wheel)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("PIP_NO_CACHE_DIR", None)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """penwatch's wheel, built from a copy of the sources (the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for package in ("penwatch", "dashboard"):  # dashboard/ installs as penwatch.dashboard
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(src)],
        env=_clean_env(),
    )
    (path,) = dist.glob("penwatch-*.whl")
    return path


def _venv(root: pathlib.Path, requirement: str) -> pathlib.Path:
    _run([sys.executable, "-m", "venv", str(root)], timeout=300)
    py = root / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "--quiet", requirement], env=_clean_env())
    return py


def test_wheel_carries_the_dashboard_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "penwatch/dashboard/app.py" in names
    assert "penwatch/_extras.py" in names
    assert not [n for n in names if n.startswith("dashboard/")]  # no top-level package
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    for extra in ("dashboard", "otlp", "tensorboard", "mlflow", "wandb", "progress", "all"):
        assert f"Provides-Extra: {extra}" in text
    assert "License-Expression: MIT" in text.splitlines()  # PEP 639, not a deprecated table
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    core = [line for line in requires if "extra ==" not in line]
    assert not [line for line in core if "streamlit" in line or "sdk" in line or "tqdm" in line]


_CORE_CHECK = textwrap.dedent(
    """
    import importlib.util, sys, tempfile, os
    import penwatch as pw
    assert importlib.util.find_spec("streamlit") is None, "streamlit installed"
    assert importlib.util.find_spec("opentelemetry.sdk") is None, "otel sdk installed"
    assert importlib.util.find_spec("tqdm") is None, "tqdm installed"
    try:
        pw.sinks.MLflow()
    except ImportError as exc:
        print("MLFLOW:", exc)
    try:
        pw.sinks.TensorBoard(tempfile.mkdtemp())
    except ImportError as exc:
        print("TENSORBOARD:", exc)
    # the core works: a pipeline, a monitor, the store
    import jax.numpy as jnp
    db = os.path.join(tempfile.mkdtemp(), "s.db")
    pipe = pw.pipeline([("l2", 0.1)])
    sinks = [pw.sinks.SQLite(db), pw.sinks.OpenTelemetry()]  # the API only: no-op spans
    with pw.Monitor("core", sinks=sinks) as monitor:
        for step in range(3):
            monitor.record(step, pipe.compute(jnp.ones(4))[1])
    print("RECORDED:", monitor.stats.sinks["SQLite"].written)
    print("TRACED:", monitor.stats.sinks["OpenTelemetry"].written)
    """
)


@pytest.fixture(scope="module")
def core_venv(wheel, tmp_path_factory) -> tuple[pathlib.Path, str, subprocess.CompletedProcess]:
    """A fresh venv with the wheel and no extras, checked at once: ``(python, the core
    check's output, the dashboard command's result)``. The dashboard test then follows
    the advice the missing extra gives (``pip install 'penwatch[dashboard]'``) in the
    same venv, so the core needs installing once."""
    root = tmp_path_factory.mktemp("core")
    py = _venv(root / "venv", str(wheel))
    out = _run([str(py), "-c", _CORE_CHECK], timeout=300, env=_clean_env(), cwd=root)
    dash = subprocess.run(
        [str(py.parent / "penwatch"), "dashboard", "--db", str(root / "x.db")],
        capture_output=True, text=True, timeout=120, env=_clean_env(), cwd=root,
    )  # fmt: skip
    return py, out.stdout, dash


def test_fresh_venv_without_extras(core_venv):
    _, stdout, dash = core_venv
    assert "MLFLOW: pw.sinks.MLflow needs the 'mlflow' extra" in stdout
    assert "pip install 'penwatch[mlflow]'" in stdout
    assert "TENSORBOARD: pw.sinks.TensorBoard needs the 'tensorboard' extra" in stdout
    assert "RECORDED: 3" in stdout and "TRACED: 3" in stdout
    assert dash.returncode == 1
    assert "penwatch dashboard needs the 'dashboard' extra" in dash.stderr
    assert "pip install 'penwatch[dashboard]'" in dash.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fresh_venv_with_dashboard_extra_serves_and_renders(wheel, core_venv, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"LOUD SKIP: {CHROMIUM} missing (Debian package 'chromium')")
    from playwright.sync_api import sync_playwright

    py = core_venv[0]  # the extra added as the core venv's error message advises
    _run([str(py), "-m", "pip", "install", "--quiet", f"{wheel}[dashboard]"], env=_clean_env())
    db = tmp_path / "runs.db"
    write = (
        "import sys, penwatch as pw\n"
        "from penwatch.store._synthetic import synthetic_record\n"
        "with pw.Monitor('wheel-run', sinks=[pw.sinks.SQLite(sys.argv[1])]) as m:\n"
        "    for s in range(50):\n"
        "        m.record(s, dict(synthetic_record('wheel-run', s).values))\n"
    )
    _run([str(py), "-c", write, str(db)], timeout=300, env=_clean_env(), cwd=tmp_path)
    port = _free_port()
    log = open(tmp_path / "dashboard.log", "w")  # noqa: SIM115 - closed below
    app = subprocess.Popen(
        [str(py.parent / "penwatch"), "dashboard", "--db", str(db), "--port", str(port)],
        env=_clean_env(), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            assert app.poll() is None, (tmp_path / "dashboard.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard never answered"
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("text=penalties while you train", timeout=90_000)
            page.wait_for_selector("[data-testid='stMetricValue']", timeout=90_000)
            page.wait_for_selector("text=wheel-run", timeout=60_000)
            assert not page.query_selector("[data-testid='stException']")
            browser.close()
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        try:
            app.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, signal.SIGKILL)
        log.close()
