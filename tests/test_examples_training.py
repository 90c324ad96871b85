"""The training and optax examples run (quick mode), and run_all.sh covers every example."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import run_examples

pytestmark = pytest.mark.concurrent

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
    "fixing_a_strong_penalty.py": [
        "[GradientTugOfWar] penalty 'hidden' holds the task back",
        "suggest_weights: feasible=True",
        "median suggested weight",
        "after the fix: task loss",
    ],
    "optax_full_integration.py": ["AGC clip_factor=0.1", "centralization", "step    0"],
}


@pytest.fixture(scope="module")
def example_runs() -> dict[str, subprocess.CompletedProcess]:
    return run_examples(EXPECTED, env={"PENWATCH_EXAMPLE_QUICK": "1"})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(example_runs, name):
    result = example_runs[name]
    output = result.stdout + result.stderr  # the logging lines go to stderr
    assert result.returncode == 0, f"{name} failed:\n{output[-4000:]}"
    for line in EXPECTED[name]:
        assert line in output, f"{name}: {line!r} missing from output:\n{output}"


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
