"""The pipeline examples run as scripts and print what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.concurrent

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "pipeline_composition.py": [
        "1. built-in pipeline",
        "entropy_weighted",
        "collapse_weighted",
        "100 weight updates under jit -> 1 trace(s)",
        "6. multi-input pipeline",
        "event penwatch.pipeline.compute.stop: pipeline='reg'",
    ],
    "gradient_tracking.py": [
        "argmax_conf_grad_norm    skipped (differentiable=False)",
        "-> dominant term: base; l2 fights the task: True",
        "-> dominant term: l2; l2 fights the task: True",
    ],
}


def test_pipeline_examples_run():
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / name)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in EXPECTED
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name} failed:\n{err}"
        for line in EXPECTED[name]:
            assert line in out, f"{name}: missing {line!r} in output:\n{out}"
        if name == "gradient_tracking.py":  # one-pass total norm == |grad compute_total|
            lines = {ln.split()[0]: ln.split()[-1] for ln in out.splitlines() if ln.strip()}
            assert abs(float(lines["total_grad_norm"]) - float(lines["check:"])) < 1e-4
