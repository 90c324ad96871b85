"""The core (math layer) examples run as scripts and print the numbers they promise."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import run_examples

pytestmark = pytest.mark.concurrent

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {
    "basic_usage.py": [
        "l1 = 6.5000",  # the seed README's numbers
        "l2(strength=0.01) = 0.1425",
        "elastic_net(l1_ratio=0.5) = 10.3750",
        "l1(reduction='mean') = 1.6250",
        "l2(reduction='none') = [1.0, 4.0, 9.0, 0.25]",
        "l2(center='mean') = 12.6875",  # mean 0.625: sum (x - 0.625)^2
        "l2(clip=1.0) = 3.2500",
        "l2(center=0.5, clip=2.0) = 8.2500",  # [0.5, -2, 2, 0] -> 0.25 + 4 + 4 + 0
        "gradient = [-1.99, -3.0]",  # L1 subgradient at 0 is 0
        "l2 of bfloat16 weights has dtype bfloat16",
        "ValueError: penwatch.l2: option 'clip' must be a finite real number > 0, got -1.0",
    ],
    "entropy_normalization.py": [
        f"max entropy for 4 classes: log(4) = {math.log(4):.4f}",
        "uniform  entropy = 1.3863  normalized = 1.0000  bonus = -1.3863",
        "one-hot  entropy = 0.0000  normalized = 0.0000  bonus = 0.0000",
        "temperature 1.0: normalized entropy = 0.6784",
        "mean normalized entropy = 0.5595",
        "bonus gradient finite: True",
    ],
    "constraints.py": [
        "orthogonality(mode='soft') = 2.0000",
        "orthogonality(mode='hard') = 2.0000",
        "orthogonality(mode='spectral') = 1.0000",
        "orthogonality of the identity (spectral) = 0.0000",
        "spectral gradient at the optimum is zero: True",
        "consistency(metric='mse') = 0.025000",
        "consistency(metric='l1') = 0.116667",
    ],
    "gradient_penalty.py": [
        "gradient norm = 1.0000",
        "gradient_penalty(target_norm=1.0) = 0.0000",
        "gradient_penalty(target_norm=0.5) = 0.2500",
        "per-sample gradient_penalty = 0.6667",
        f"output_magnitude_penalty(target=1.0) = {(math.sqrt(2.5) - 1) ** 2:.4f}",
        f"interpolated_gradient_penalty = {(2 * math.sqrt(2) - 1) ** 2:.4f}",
        "same key, same value: True",
        "gradient penalty applied at steps [0, 5, 10]",
    ],
}


def _value(out: str, prefix: str) -> float:
    for line in out.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :].split("=")[1].split(",")[0])
    raise AssertionError(f"no line starting with {prefix!r} in:\n{out}")


def test_core_examples_run_and_print_expected_numbers():
    outputs = {}
    for name, result in run_examples(EXPECTED, timeout=120).items():
        assert result.returncode == 0, f"{name} failed:\n{result.stderr}"
        for line in EXPECTED[name]:
            assert line in result.stdout, f"{name}: missing {line!r} in output:\n{result.stdout}"
        outputs[name] = result.stdout
    entropy_out = outputs["entropy_normalization.py"]
    sharp = _value(entropy_out, "temperature 0.5")
    flat = _value(entropy_out, "temperature 2.0")
    assert sharp < 0.6784 < flat  # T < 1 sharpens, T > 1 flattens
    before = _value(entropy_out, "entropy before bonus step")
    after = float(entropy_out.split("after = ")[1].split()[0])
    assert after > before  # a bonus step raises the entropy
