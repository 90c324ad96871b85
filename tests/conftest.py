"""Shared pytest helpers for the penwatch suite."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_examples(
    names: Iterable[str], *, env: Mapping[str, str] | None = None, timeout: float = 240
) -> dict[str, subprocess.CompletedProcess]:
    """Run ``examples/NAME`` scripts concurrently (each is mostly JAX compilation).

    Returns each script's ``CompletedProcess`` (stdout and stderr captured apart); a
    script still running after ``timeout`` seconds is killed and reported with its
    return code.
    """
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / name)],
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results
