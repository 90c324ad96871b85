"""Replay a capsule: name the primitive, the line and the pass that made the first
non-finite value (SPEC section 13).

:func:`replay` runs the captured step twice on the captured inputs:

1. as compiled (the same jitted program on the same inputs), giving the non-finite
   report that is compared with the one recorded in the capsule (``reproduced``);
2. equation by equation through its jaxpr, checking every output: the first equation
   whose inputs are all finite and whose output is not is where the value entered. Its
   primitive, its source frames (from the jaxpr's ``source_info``, JAX's own frames
   left out) and its name stack (``transpose(...)``: the backward pass) are reported.

The equation-by-equation run is ``jax_debug_nans``' idea applied once, to one step,
after the fact, and it also catches Inf (``log(0)``) where ``jax_debug_nans`` and
``checkify``'s NaN checks only see the NaN that follows.
"""

from __future__ import annotations

import dataclasses
import json
import linecache
import logging
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from penwatch.forensics._capsule import FORMAT, _metrics_of, step_report

__all__ = ["Capsule", "Frame", "Replay", "Replayable", "load", "replay"]

_FN = "penwatch.forensics.replay"
logger = logging.getLogger("penwatch.forensics")
# Frames inside these packages are not "the user's line".
_LIBRARIES = ("jax", "jaxlib", "optax", "flax", "equinox", "penwatch")
# Primitives whose sub-jaxpr takes their operands one-to-one: interpreted inside.
_CALL_LIKE = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "remat",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "custom_lin",
    }
)


def _package_dirs(names: Sequence[str]) -> tuple[str, ...]:
    import importlib.util

    dirs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(os.path.realpath(p) + os.sep for p in spec.submodule_search_locations)
    return tuple(dirs)


@runtime_checkable
class Replayable(Protocol):
    """A step function that runs different compiled programs on different steps
    (penwatch's ``StepFunction``: with or without gradient diagnostics)."""

    def program_for(self, step: int) -> Callable[..., Any]:
        """The function that ran step ``step``."""
        ...


@dataclasses.dataclass(frozen=True)
class Capsule:
    """A loaded capsule.

    Attributes:
      path: its directory.
      manifest: ``manifest.json`` as a dict.
      leaves: ``{keystr path: np.ndarray}``, the step's inputs (typed PRNG keys as
        ``jax.Array`` keys again).
      args: the inputs as the step's argument tuple, or None when ``treedef.pkl``
        does not load here (it refers to the step's static parts, e.g. a penalty
        function, by module and name: import that module first, or pass ``like=``).
    """

    path: Path
    manifest: Mapping[str, Any]
    leaves: Mapping[str, Any]
    args: tuple[Any, ...] | None

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def load(path: str | os.PathLike[str]) -> Capsule:
    """Load a capsule directory written by :class:`CapsuleWriter`.

    Raises:
      FileNotFoundError: no ``manifest.json`` in ``path``.
      ValueError: the manifest is not a penwatch capsule.
    """
    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise FileNotFoundError(f"penwatch.forensics.load: no manifest.json in {str(path)!r}")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"penwatch.forensics.load: {str(manifest_file)!r} has format "
            f"{manifest.get('format')!r}, expected {FORMAT!r}"
        )
    leaves: dict[str, Any] = {}
    with np.load(path / "inputs.npz", allow_pickle=False) as npz:
        for entry in manifest["leaves"]:
            value = npz[entry["path"]]
            if entry.get("prng_impl"):  # a typed PRNG key, saved as its key data
                value = jax.random.wrap_key_data(value, impl=entry["prng_impl"])
            leaves[entry["path"]] = value
    args = None
    if manifest.get("treedef"):
        try:
            treedef = pickle.loads((path / manifest["treedef"]).read_bytes())
        except Exception as e:  # e.g. a penalty function from a module not imported here
            logger.info("penwatch.forensics.load: treedef.pkl of %s not loaded: %s", path, e)
        else:
            args = jax.tree_util.tree_unflatten(
                treedef, [leaves[e["path"]] for e in manifest["leaves"]]
            )
    return Capsule(path, manifest, leaves, args)


@dataclasses.dataclass(frozen=True)
class Frame:
    """One source frame: ``file:line`` in ``function``, with the line's text."""

    file: str
    line: int
    function: str
    code: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}: {self.code}"


@dataclasses.dataclass(frozen=True)
class Replay:
    """Where a capsule's first non-finite value was produced.

    Attributes:
      step: the captured step.
      primitive: the JAX primitive that produced it (``log``, ``div``, ``sqrt``...), or
        None when the value came with the inputs.
      derivative_of: for a value made by a derivative rule, the primitive it
        differentiates (``sqrt`` for the ``div`` in ``0.5 / sqrt(x)``), else None.
      where: the first frame outside JAX, optax, Flax, Equinox and penwatch (the
        user's line), or the first frame outside JAX when there is none.
      frames: every frame outside JAX, innermost first.
      pass_: ``"forward"`` (the loss or a penalty value is non-finite),
        ``"backward"`` (the values are finite, a gradient is not) or ``"inputs"``.
      name_stack: the equation's JAX name stack (``transpose(jvp(...))`` in the
        backward pass).
      term: the loss term it belongs to (the first offender: a penalty name, or
        ``"base"`` for the task loss), when the step returns penwatch metrics.
      nonfinite: the replayed non-finite metrics, first offender first.
      leaves: the replayed non-finite leaves (``{tree, path, nan, inf}``), nearest the
        source first.
      input_leaves: capsule leaves that were non-finite already (``{path, nan, inf}``).
      original: the report recorded when the step ran.
      reproduced: whether the replay gives exactly the recorded non-finite metrics
        and leaf counts.
    """

    step: int
    primitive: str | None
    derivative_of: str | None
    where: Frame | None
    frames: tuple[Frame, ...]
    pass_: str
    name_stack: str
    term: str | None
    nonfinite: tuple[Mapping[str, Any], ...]
    leaves: tuple[Mapping[str, Any], ...]
    input_leaves: tuple[Mapping[str, Any], ...]
    original: Mapping[str, Any]
    reproduced: bool

    def __str__(self) -> str:
        lines = [f"step {self.step}: first non-finite value"]
        if self.primitive is None:
            bad = ", ".join(f"{x['path']} ({x['nan']} nan, {x['inf']} inf)" for x in
                            self.input_leaves[:5])  # fmt: skip
            lines.append(f"  came with the inputs: {bad}")
        else:
            prim = self.primitive + (
                f" (derivative of {self.derivative_of})" if self.derivative_of else ""
            )
            lines.append(f"  primitive: {prim}")
            lines.append(f"  pass:      {self.pass_}")
            if self.where is not None:
                lines.append(f"  line:      {self.where.file}:{self.where.line}")
                lines.append(f"  function:  {self.where.function}")
                lines.append(f"  code:      {self.where.code}")
        if self.term is not None:
            lines.append(f"  term:      {self.term}")
        if self.nonfinite:
            keys = ", ".join(f"{x['key']} ({x['kind']})" for x in self.nonfinite[:6])
            more = len(self.nonfinite) - 6
            lines.append(f"  metrics:   {keys}" + (f" and {more} more" if more > 0 else ""))
        if self.leaves:
            shown = ", ".join(f"{x['tree']}{x['path']} ({x['nan']} nan, {x['inf']} inf)"
                              for x in self.leaves[:5])  # fmt: skip
            lines.append(f"  leaves:    {shown}")
        lines.append(
            "  reproduced: "
            + ("yes (same non-finite metrics and leaf counts)" if self.reproduced else "NO")
        )
        return "\n".join(lines)


# --- the equation-by-equation interpreter ---------------------------------------------


def _bad(values: Sequence[Any]) -> bool:
    for v in values:
        dtype = getattr(v, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            continue  # keys are never non-finite (and do not convert to NumPy)
        a = np.asarray(v)
        if a.dtype.kind in "fc" and a.size and not np.isfinite(a).all():
            return True
    return False


@dataclasses.dataclass
class _Found:
    eqn: Any
    producers: list[Any]


class _Stop(Exception):
    pass


def _callee(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    if eqn.primitive.name not in _CALL_LIKE:
        return None
    for value in eqn.params.values():
        jaxpr, consts = None, ()
        if isinstance(value, jcore.ClosedJaxpr):
            jaxpr, consts = value.jaxpr, value.consts
        elif isinstance(value, jcore.Jaxpr):
            jaxpr = value
        if (
            jaxpr is not None
            and len(jaxpr.invars) == len(eqn.invars)
            and len(jaxpr.outvars) == len(eqn.outvars)
        ):
            return jaxpr, consts
    return None


def _interpret(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> _Found | None:
    found: list[_Found] = []

    def run(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        env: dict[Any, Any] = {}
        producer: dict[Any, Any] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = c
        for v, a in zip(jaxpr.invars, args, strict=True):
            env[v] = a
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            sub = _callee(eqn)
            if sub is not None:
                outvals = run(sub[0], sub[1], invals)
            else:
                out = eqn.primitive.bind(*invals, **eqn.params)
                outvals = list(out) if eqn.primitive.multiple_results else [out]
                if _bad(outvals) and not _bad(invals):
                    producers = [producer.get(v) for v in eqn.invars if isinstance(v, jcore.Var)]
                    found.append(_Found(eqn, [p for p in producers if p is not None]))
                    raise _Stop
            for v, val in zip(eqn.outvars, outvals, strict=True):
                env[v] = val
                producer[v] = eqn
        return [read(v) for v in jaxpr.outvars]

    try:
        run(jaxpr, consts, args)
    except _Stop:
        return found[0]
    return None


def _frames(eqn: Any) -> list[Frame]:
    tb = eqn.source_info.traceback
    if tb is None:
        return []
    jax_dirs = _package_dirs(("jax", "jaxlib"))
    out = []
    for f in tb.frames:
        real = os.path.realpath(f.file_name)
        if real.startswith(jax_dirs) or f.file_name.startswith("<frozen"):
            continue
        code = linecache.getline(f.file_name, f.line_num).strip()
        out.append(Frame(f.file_name, f.line_num, f.function_name, code))
    return out


def _user_frame(frames: Sequence[Frame]) -> Frame | None:
    libs = _package_dirs(_LIBRARIES)
    for f in frames:
        if not os.path.realpath(f.file).startswith(libs):
            return f
    return frames[0] if frames else None


def _same_key(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return list(a.get("nonfinite", [])) == list(b.get("nonfinite", [])) and list(
        a.get("leaves", [])
    ) == list(b.get("leaves", []))


def _input_leaves(leaves: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for path, a in leaves.items():
        if isinstance(a, np.ndarray) and a.dtype.kind in "fc":
            nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            if nan or inf:
                out.append({"path": path, "nan": nan, "inf": inf})
    return out


def replay(
    capsule: Capsule | str | os.PathLike[str],
    step_fn: Callable[..., Any],
    *,
    like: Any = None,
) -> Replay:
    """Re-run a captured step and name where its first non-finite value was produced.

    Args:
      capsule: a :class:`Capsule` or its directory.
      step_fn: the step function that ran (a penwatch ``StepFunction``, a jitted
        function, or any function of the captured arguments returning ``(state,
        metrics)`` or ``metrics``).
      like: an example of the step's argument tuple, whose structure rebuilds the
        inputs when the capsule has no loadable ``treedef.pkl``.

    Returns:
      A :class:`Replay` (``str()`` gives the human-readable report).
    """
    if not isinstance(capsule, Capsule):
        capsule = load(capsule)
    if not callable(step_fn):
        raise TypeError(f"{_FN}: argument 'step_fn' must be callable, got {step_fn!r}")
    args = capsule.args
    if args is None:
        if like is None:
            raise ValueError(
                f"{_FN}: the capsule {str(capsule.path)!r} has no loadable treedef.pkl; "
                "pass like=<an example of the step's arguments>"
            )
        flat, treedef = jax.tree_util.tree_flatten_with_path(tuple(like))
        args = jax.tree_util.tree_unflatten(
            treedef, [capsule.leaves[jax.tree_util.keystr(p)] for p, _ in flat]
        )
    args = tuple(jax.tree.map(jnp.asarray, args))
    fn = step_fn.program_for(capsule.step) if isinstance(step_fn, Replayable) else step_fn

    metrics = _metrics_of(fn(*args))
    report = step_report(metrics)
    original = dict(capsule.manifest.get("report") or {})
    reproduced = _same_key(report, original)
    input_leaves = _input_leaves(capsule.leaves)
    first = report["nonfinite"][0] if report["nonfinite"] else None
    term = None
    if first is not None:
        term = first["penalty"] or ("base" if first["source"] in ("loss", "gradient") else None)
    values_bad = any(x["source"] in ("penalty", "loss", "total") for x in report["nonfinite"])

    primitive = derivative_of = None
    frames: list[Frame] = []
    name_stack = ""
    pass_ = "inputs" if input_leaves else ("forward" if values_bad else "backward")
    if not input_leaves:
        closed = jax.make_jaxpr(fn)(*args)
        flat_args = jax.tree.leaves(args)
        found = _interpret(closed.jaxpr, closed.consts, flat_args)
        if found is not None:
            eqn = found.eqn
            primitive = eqn.primitive.name
            name_stack = str(eqn.source_info.name_stack)
            frames = _frames(eqn)
            backward = "transpose" in name_stack or not values_bad
            pass_ = "backward" if backward else "forward"
            if pass_ == "backward":
                here = [(f.file, f.line) for f in frames[:1]]
                for p in found.producers:
                    if [(f.file, f.line) for f in _frames(p)[:1]] == here:
                        derivative_of = p.primitive.name
                        break
    return Replay(
        step=capsule.step,
        primitive=primitive,
        derivative_of=derivative_of,
        where=_user_frame(frames),
        frames=tuple(frames),
        pass_=pass_,
        name_stack=name_stack,
        term=term,
        nonfinite=tuple(report["nonfinite"]),
        leaves=tuple(report["leaves"]),
        input_leaves=tuple(input_leaves),
        original=original,
        reproduced=reproduced,
    )
