"""Optional dependencies (SPEC section 14): a feature whose extra is missing raises an
ImportError that names the extra and the pip command; the core imports without them."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT

import penwatch as pw
from penwatch import _extras, cli


def _hide(monkeypatch, *modules: str) -> None:
    """Make ``import <module>`` fail as if it were not installed."""
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in modules):
            monkeypatch.delitem(sys.modules, name)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def test_require_names_the_extra_and_the_command(monkeypatch):
    _hide(monkeypatch, "tensorboardX")
    with pytest.raises(ImportError, match=r"needs the 'tensorboard' extra") as info:
        _extras.require("tensorboardX", extra="tensorboard", feature="pw.sinks.TensorBoard")
    assert isinstance(info.value, _extras.MissingExtraError)
    assert "pip install 'penwatch[tensorboard]'" in str(info.value)
    with pytest.raises(ValueError, match="option 'extra' must be one of"):
        _extras.require("x", extra="nope", feature="f")
    assert _extras.require("json", extra="progress", feature="f").dumps  # present: imported


def _tiny_trainer(**options):
    import jax.numpy as jnp
    import optax

    return pw.trainer(
        lambda p, x: x @ p["w"],
        optax.l2_loss,
        pw.pipeline([("l2", 1e-3)]),
        optax.sgd(0.1),
        {"w": jnp.ones((2, 1))},
        [(jnp.ones((4, 2)), jnp.zeros((4, 1)))],
        **options,
    )


@pytest.mark.parametrize(
    ("modules", "extra", "use"),
    [
        (("tensorboardX",), "tensorboard", lambda tmp: pw.sinks.TensorBoard(tmp)),
        (("mlflow",), "mlflow", lambda tmp: pw.sinks.MLflow(tracking_uri="sqlite:///x.db")),
        (("wandb",), "wandb", lambda tmp: pw.sinks.WandB(mode="offline")),
        (
            ("tqdm",),
            "progress",
            lambda tmp: _tiny_trainer(progress=True),
        ),
    ],
    ids=["tensorboard", "mlflow", "wandb", "progress"],
)
def test_each_feature_names_its_extra(monkeypatch, tmp_path, modules, extra, use):
    _hide(monkeypatch, *modules)
    if extra == "tensorboard":
        monkeypatch.setattr("penwatch.sinks._tensorboard._TBX", [])
    with pytest.raises(ImportError, match=rf"pip install 'penwatch\[{extra}\]'"):
        use(tmp_path)


def test_otlp_tracing_names_its_extra(monkeypatch):
    from penwatch._demo import _tracing

    _hide(monkeypatch, "opentelemetry.sdk")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    with pytest.raises(ImportError, match=r"pip install 'penwatch\[otlp\]'"):
        _tracing.configure_tracing()
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    assert _tracing.configure_tracing() is None  # not asked for: no SDK needed


def test_trainer_progress_defaults_to_off_without_tqdm(monkeypatch):
    _hide(monkeypatch, "tqdm")
    assert len(_tiny_trainer().history) == 1


def test_dashboard_command_without_streamlit_names_the_extra(monkeypatch, capsys):
    monkeypatch.setattr(_extras, "available", lambda module: module != "streamlit")
    assert cli.main(["dashboard", "--db", "x.db"]) == 1
    err = capsys.readouterr().err
    assert "penwatch dashboard needs the 'dashboard' extra" in err
    assert "pip install 'penwatch[dashboard]'" in err


def test_pyproject_extras_match_the_table():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(_extras.EXTRAS) | {"all", "dev"} == set(extras)
    assert extras["all"] == [f"penwatch[{','.join(_extras.EXTRAS)}]"]
    core = " ".join(project["dependencies"])
    for heavy in (
        "streamlit",
        "opentelemetry-sdk",
        "otlp",
        "tqdm",
        "mlflow",
        "tensorboard",
        "wandb",
    ):
        assert heavy not in core


def test_core_import_loads_no_optional_module():
    code = (
        "import sys, penwatch as pw; pw.sinks.SQLite; import penwatch.cli;"
        "optional = ('streamlit', 'opentelemetry.sdk', 'tqdm', 'mlflow', 'tensorboardX', 'wandb');"
        "print([m for m in optional if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_demo_without_streamlit_trains_without_the_dashboard(monkeypatch, capsys):
    monkeypatch.setattr(_extras, "available", lambda module: module != "streamlit")
    assert cli._start_dashboard("x.db", 8599) is None  # nothing started
    err = capsys.readouterr().err
    assert "the demo's dashboard needs the 'dashboard' extra" in err
    assert "pip install 'penwatch[dashboard]'" in err and "training without it" in err
