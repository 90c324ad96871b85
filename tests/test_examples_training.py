"""The training and optax examples run (quick mode), and run_all.sh covers every example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# example -> lines its output must contain (what the example demonstrates).
EXPECTED = {
    "curriculum_learning.py": ["== 1. Schedule values", "compilations: 1", "(2·w·x)"],
    "flax_training.py": ["model.apply as apply_fn", "Flax NNX", "mean |hidden1|="],
    "training_full_integration.py": [
        "wrap_loss_with_pipeline",
        "base_grad_share=",
        "compilations of the step: 1",
        "activity l1 weight=0.001",
        "penwatch.training: step 0:",
    ],
    "optax_integration.py": ["coupled vs decoupled", "near-zero weights=", "Composition"],
    "optax_full_integration.py": ["AGC clip_factor=0.1", "centralization", "step    0"],
}


@pytest.fixture(scope="module")
def example_runs() -> dict[str, subprocess.CompletedProcess]:
    """Run the examples concurrently (each is mostly JAX compilation)."""
    env = {**os.environ, "PENWATCH_EXAMPLE_QUICK": "1", "JAX_PLATFORMS": "cpu"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / name)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in EXPECTED
    }
    out = {}
    for name, proc in procs.items():
        try:
            stdout, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout)
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(example_runs, name):
    result = example_runs[name]
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-4000:]}"
    for line in EXPECTED[name]:
        assert line in result.stdout, f"{name}: {line!r} missing from output:\n{result.stdout}"


def test_run_all_lists_every_example():
    listed = subprocess.run(
        ["bash", str(EXAMPLES / "run_all.sh"), "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split("\n")
    names = [line.split()[0] for line in listed if line.strip()]
    assert names == sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert set(EXPECTED) <= set(names)
    for line in listed:  # examples with long-run flags get small values
        if line.startswith(("live_training.py", "multiprocess_training.py")):
            assert "--steps" in line
