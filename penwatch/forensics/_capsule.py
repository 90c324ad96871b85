"""Capsules: the exact inputs of the first non-finite step of each episode (SPEC section 13).

A :class:`CapsuleWriter` watches the steps a training loop dispatches. It keeps a
reference to each step's inputs (JAX arrays are immutable, so a reference *is* the
exact input; nothing is copied on the training thread) until that step's metrics are
computed, then reads them without blocking (``jax.Array.is_ready``) and drops the
inputs of a finite step. The first non-finite step of an episode (after a finite step,
or the first step) has its inputs handed to a background thread that copies them to the
host and writes a capsule directory::

    DIR/step_00000492/
        inputs.npz       # one array per leaf, keyed by jax.tree_util.keystr path (typed
                         # PRNG keys as their key data; the manifest names the impl)
        manifest.json    # step, leaf paths/dtypes/shapes, the non-finite report
        treedef.pkl      # the pytree structure (for pw.forensics.load; optional)

``inputs.npz`` and ``manifest.json`` load with NumPy and the standard library alone.

Cost: on the training thread a few microseconds per step plus one small host read of
each step's metrics buffers once they are ready; in memory, the inputs of the steps
whose metrics have not been read yet — in steady state the previous step's (one extra
copy of params + optimizer state + batch), at most ``depth`` of them: when ``depth``
steps are unread the training thread waits for the oldest (so the host runs at most
``depth`` steps ahead of the device). Train steps that donate their inputs
(``donate_argnums``) cannot be captured: a donated input is gone once the step ran.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import logging
import os
import pickle
import queue
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from penwatch import _checks
from penwatch.schema import LEAF_COUNTS, Metrics, find_nonfinite, layout_of
from penwatch.schema import leaf_reports as _leaf_reports

__all__ = ["FORMAT", "CapsuleWriter", "capsule_dir_name", "replay_command", "step_report"]

logger = logging.getLogger("penwatch.forensics")
_FN = "penwatch.forensics.CapsuleWriter"
FORMAT = "penwatch-capsule/1"
"""The ``format`` field of a capsule's ``manifest.json``."""


def capsule_dir_name(step: int) -> str:
    """The directory name of the capsule of ``step`` (``step_00000492``)."""
    return f"step_{int(step):08d}"


def replay_command(capsule: str | os.PathLike[str], step_fn_spec: str | None = None) -> str:
    """The ``penwatch replay`` command line for a capsule directory (``step_fn_spec``:
    ``"module:function"``, else a placeholder for it)."""
    return f"penwatch replay {capsule} --step-fn {step_fn_spec or '<module:step_fn_factory>'}"


@dataclasses.dataclass(frozen=True)
class _Pending:
    step: int
    args: tuple[Any, ...]
    metrics: Any
    program: str | None


def _ready(metrics: Any) -> bool:
    """Whether a step's metrics are computed. The outputs of one compiled call become
    ready together, so one buffer tells (flattening the whole tree cost 10 us a step)."""
    leaves = metrics.buffers if isinstance(metrics, Metrics) and metrics.buffers else None
    for leaf in leaves or jax.tree.leaves(metrics):
        return not isinstance(leaf, jax.Array) or leaf.is_ready()
    return True


def _is_prng_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _quick_bad(metrics: Any) -> bool:
    """Whether a step's metrics show a non-finite value (one host read per buffer)."""
    if isinstance(metrics, Metrics):
        for buf in metrics.buffers:
            host = np.asarray(buf)
            if host.dtype.kind == "f" and not np.isfinite(host).all():
                return True
        if LEAF_COUNTS in metrics:  # a non-finite leaf whose metrics stayed finite
            return any(np.asarray(c).any() for c in jax.tree.leaves(metrics[LEAF_COUNTS]))
        return False
    for leaf in jax.tree.leaves(metrics):
        host = np.asarray(leaf)
        if host.dtype.kind in "fc" and not np.isfinite(host).all():
            return True
    return False


def step_report(metrics: Any) -> dict[str, Any]:
    """The non-finite report of one step's metrics, as JSON-ready data.

    Args:
      metrics: a step's ``pw.Metrics`` (or a mapping of arrays), device or host.

    Returns:
      ``{"nonfinite": [{key, kind, source, penalty}, ...] (first offender first),
      "leaves": [{tree, path, nan, inf}, ...] (every non-finite leaf, nearest the
      source first)}``.
    """
    if isinstance(metrics, Metrics):
        host = jax.device_get(metrics)
        values = host.scalars()
        layout = layout_of(values, host.penalties or None)
        found = find_nonfinite([values[k] for k in layout.keys], layout)
        counts = host.reserved.get(LEAF_COUNTS)
        leaves = _leaf_reports(counts, max_leaves=1 << 30)
    else:
        values = {}
        for k, v in dict(metrics).items():
            a = np.asarray(v)
            if a.ndim == 0 and a.dtype.kind in "fbiu":
                values[str(k)] = float(a)
        layout = layout_of(values)
        found = find_nonfinite([values[k] for k in layout.keys], layout)
        leaves = ()
    return {
        "nonfinite": [
            {"key": nf.key, "kind": nf.kind, "source": nf.source, "penalty": nf.penalty}
            for nf in found
        ],
        "leaves": [
            {"tree": lf.tree, "path": lf.path, "nan": lf.nan_count, "inf": lf.inf_count}
            for lf in leaves
        ],
    }


def _metrics_of(out: Any) -> Any:
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        return out[1]
    if isinstance(out, Mapping):
        return out
    raise TypeError(
        f"{_FN}.wrap: the step must return (state, metrics) or metrics, with metrics a "
        f"pw.Metrics or a mapping of arrays; got {type(out).__name__}"
    )


class CapsuleWriter:
    """Saves the inputs of the first non-finite step of each episode (SPEC section 13).

    Penwatch's train-step builders and ``pw.trainer`` make one from ``nan_capsule=DIR``;
    for a hand-written loop wrap the step function::

        capsules = pw.forensics.CapsuleWriter("capsules")
        step = capsules.wrap(train_step)   # same signature, same compiled program
        ...
        capsules.close()

    Attributes:
      written: capsule directories written so far (by the writer thread).
      nonfinite_steps, episodes: non-finite steps and episodes seen.
      skipped: episodes not captured (``max_capsules`` reached).
      errors: failed metric reads or writes (logged; training goes on).
      max_held: the most step inputs held between two steps (at most ``depth``).

    Args:
      directory: where capsules go (created when needed).
      max_capsules: at most this many capsules per writer (later episodes are counted
        in :attr:`skipped`, not written).
      depth: the most steps whose inputs are kept while their metrics are not read yet.
      step_fn_spec: ``"module:function"`` naming a zero-argument factory of the step
        function (or the step function itself); recorded in the manifest and used in
        the ``penwatch replay`` command line that :meth:`replay_command` prints.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_capsules: int = 8,
        depth: int = 4,
        step_fn_spec: str | None = None,
    ) -> None:
        if not isinstance(directory, str | os.PathLike) or not str(directory):
            raise _checks.option_error(_FN, "directory", directory, "a directory path")
        self.directory = Path(directory)
        self.max_capsules = _checks.check_int(_FN, "max_capsules", max_capsules, min=1)
        self.depth = _checks.check_int(_FN, "depth", depth, min=1)
        if step_fn_spec is not None and (
            not isinstance(step_fn_spec, str) or step_fn_spec.count(":") != 1
        ):
            raise _checks.option_error(
                _FN, "step_fn_spec", step_fn_spec, "None or 'module:function'"
            )
        self.step_fn_spec = step_fn_spec
        self._pending: collections.deque[_Pending] = collections.deque()
        self._in_episode = False
        self._planned: list[int] = []
        self.written: list[Path] = []
        self.skipped = 0
        self.errors = 0
        self.nonfinite_steps = 0
        self.episodes = 0
        self.max_held = 0
        self._queue: queue.Queue[tuple[_Pending, dict[str, Any]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- the training thread -------------------------------------------------------------

    def observe(
        self, step: int, args: Sequence[Any], metrics: Any, *, program: str | None = None
    ) -> None:
        """Note one dispatched step: its number, its inputs and its (device) metrics.

        Never blocks unless ``depth`` steps are unread (then it waits for the oldest).
        """
        if self._closed:
            return
        self._pending.append(_Pending(int(step), tuple(args), metrics, program))
        while self._pending and (
            len(self._pending) > self.depth or _ready(self._pending[0].metrics)
        ):
            self._check(self._pending.popleft())
        self.max_held = max(self.max_held, len(self._pending))

    def wrap(self, step_fn: Callable[..., Any], *, start_step: int = 0) -> Callable[..., Any]:
        """``step_fn`` observed: same arguments and results, steps numbered from
        ``start_step``. The step must return ``(state, metrics)`` or ``metrics``."""
        _checks.check_callable(f"{_FN}.wrap", "step_fn", step_fn, label="argument")
        counter = [_checks.check_int(f"{_FN}.wrap", "start_step", start_step, min=0)]

        def wrapped(*args: Any) -> Any:
            out = step_fn(*args)
            self.observe(counter[0], args, _metrics_of(out))
            counter[0] += 1
            return out

        return wrapped

    def _check(self, item: _Pending) -> None:
        try:
            bad = _quick_bad(item.metrics)
        except Exception:  # a metrics read must never break training
            self.errors += 1
            logger.exception("penwatch capsule: reading step %d's metrics failed", item.step)
            return
        if not bad:
            self._in_episode = False
            return
        self.nonfinite_steps += 1
        if self._in_episode:
            return
        self._in_episode = True
        self.episodes += 1
        if len(self._planned) >= self.max_capsules:
            self.skipped += 1
            return
        self._planned.append(item.step)
        try:
            report = step_report(item.metrics)
        except Exception:
            self.errors += 1
            logger.exception("penwatch capsule: the report of step %d failed", item.step)
            report = {"nonfinite": [], "leaves": []}
        self._start()
        self._queue.put((item, report))

    # -- paths and commands --------------------------------------------------------------

    def path_for(self, step: int) -> Path:
        """Where the capsule of ``step`` is (or will be) written."""
        return self.directory / capsule_dir_name(step)

    def replay_command(self, step: int) -> str:
        """The ``penwatch replay`` command line for the capsule of ``step``."""
        return replay_command(self.path_for(step), self.step_fn_spec)

    # -- the writer thread ---------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="penwatch-capsule", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            got = self._queue.get()
            if got is None:
                return
            item, report = got
            try:
                self.written.append(self._write(item, report))
            except Exception:
                self.errors += 1
                logger.exception("penwatch capsule: writing step %d failed", item.step)

    def _write(self, item: _Pending, report: dict[str, Any]) -> Path:
        final = self.path_for(item.step)
        tmp = self.directory / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        flat, treedef = jax.tree_util.tree_flatten_with_path(item.args)
        arrays: dict[str, np.ndarray] = {}
        leaves = []
        for path, leaf in flat:
            key = jax.tree_util.keystr(path)
            entry: dict[str, Any] = {"path": key}
            if _is_prng_key(leaf):  # typed PRNG keys: their raw key data, and the impl
                entry["prng_impl"] = str(jax.random.key_impl(leaf))
                leaf = jax.random.key_data(leaf)
            value = np.asarray(jax.device_get(leaf))
            arrays[key] = value
            leaves.append({**entry, "dtype": str(value.dtype), "shape": list(value.shape)})
        np.savez(tmp / "inputs.npz", **arrays)
        try:
            (tmp / "treedef.pkl").write_bytes(pickle.dumps(treedef))
            treedef_file: str | None = "treedef.pkl"
        except Exception:  # an unpicklable node type: the npz still holds every leaf
            treedef_file = None
        manifest = {
            "format": FORMAT,
            "step": item.step,
            "program": item.program,
            "created": datetime.datetime.now(datetime.UTC).isoformat(),
            "jax_version": jax.__version__,
            "backend": jax.default_backend(),
            "step_fn": self.step_fn_spec,
            "treedef": treedef_file,
            "leaves": leaves,
            "report": report,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, allow_nan=False))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        logger.warning(
            "penwatch: non-finite step %d captured in %s; replay: %s",
            item.step,
            final,
            self.replay_command(item.step),
        )
        return final

    # -- shutdown ------------------------------------------------------------------------

    def flush(self) -> None:
        """Read every pending step's metrics (waiting for the device) and wait until
        every planned capsule is written."""
        while self._pending:
            self._check(self._pending.popleft())
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def close(self) -> None:
        """:meth:`flush`, then stop observing. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True

    def __repr__(self) -> str:
        return (
            f"CapsuleWriter({str(self.directory)!r}, written={len(self.written)}, "
            f"skipped={self.skipped})"
        )
