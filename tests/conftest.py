"""Shared pytest helpers for the penwatch suite."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# The processes the suite starts (the demo several times, the examples, replay CLIs,
# children killed by a signal) share one persistent JAX compilation cache: a process that
# compiles what an earlier one did loads it (the demo: 17 s of CPU cold, 4 s warm). The
# pytest processes themselves do not use it (their thousands of compilations each run
# once per suite; writing them cost ~8 % more). Entries are keyed by the program, the
# JAX version and the backend, so a stale entry is never loaded.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", None)


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


LONGEST_FIRST = ("test_wheel.py", "test_dashboard_browser.py")
"""The two longest files marked ``concurrent`` (≈ 110 s each): ``make test`` hands those
files to its two workers in collection order (``--dist loadfile --no-loadscope-reorder``),
so these start first, one per worker, and the short ones fill in after them."""


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable otherwise
