"""Built-in penalty names and the list builders ``pw.pipeline`` / ``pw.multi_pipeline``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from penwatch.pipelines import _builtins
from penwatch.pipelines._multi import MultiPipeline
from penwatch.pipelines._pipeline import Pipeline

__all__ = ["builtin_penalties", "multi_pipeline", "pipeline"]


def builtin_penalties(*, multi: bool = False) -> dict[str, Callable[..., jax.Array]]:
    """Built-in names and their functions: ``pw.pipeline``'s, or ``pw.multi_pipeline``'s."""
    if multi:
        return {**_builtins.MULTI_INPUT, **_builtins.SINGLE_INPUT}
    return dict(_builtins.SINGLE_INPUT)


def _entry_parts(where: str, entry: Any, max_len: int, form: str) -> tuple[Any, ...]:
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, (tuple, list)) and 1 <= len(entry) <= max_len:
        return tuple(entry)
    raise ValueError(f"{where}: each entry must be {form}, got {entry!r}")


def _options(where: str, name: str, options: Any) -> Mapping[str, Any]:
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ValueError(
            f"{where}: options of entry {name!r} must be a dict of option names to "
            f"values, got {options!r}"
        )
    return options


def _check_entries(where: str, entries: Any) -> None:
    if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence):
        raise ValueError(f"{where}: argument 'entries' must be a list of entries, got {entries!r}")


def _known(where: str, name: Any, table: Mapping[str, Any]) -> str:
    if not isinstance(name, str) or name not in table:
        raise ValueError(
            f"{where}: unknown penalty {name!r}; valid names are {', '.join(sorted(table))}"
        )
    return name


def pipeline(entries: Sequence[Any], *, name: str = "default") -> Pipeline:
    """Build a :class:`Pipeline` from built-in names.

    Each entry is ``"l1"``, ``("l1", weight)`` or ``("l1", weight, {options})``; names are
    ``l1, l2, elastic_net, entropy, orthogonality, output_magnitude``. Weights default to
    1.0. Options are checked now.

    Example:
      >>> import penwatch as pw
      >>> pipe = pw.pipeline([("l1", 1e-3), ("l2", 1e-2), ("entropy", 0.1, {"mode": "bonus"})])
      >>> pipe.names
      ('l1', 'l2', 'entropy')

    Args:
      entries: the entries, in order.
      name: the pipeline's name.

    Raises:
      ValueError: unknown, duplicate or two-input names (``kl``, ``js``, ``consistency``
        belong to :func:`multi_pipeline`), bad weights or options.
    """
    where = "penwatch.pipeline"
    _check_entries(where, entries)
    form = "'name', ('name', weight) or ('name', weight, {options})"
    pipe = Pipeline(name=name)
    for entry in entries:
        parts = _entry_parts(where, entry, 3, form)
        key = parts[0]
        if isinstance(key, str) and key in _builtins.MULTI_INPUT:
            raise ValueError(
                f"{where}: {key!r} takes two inputs, so it belongs to pw.multi_pipeline, "
                f"e.g. pw.multi_pipeline([({key!r}, 0.1, ('student', 'teacher'))])"
            )
        key = _known(where, key, _builtins.SINGLE_INPUT)
        weight = parts[1] if len(parts) > 1 else 1.0
        options = _options(where, key, parts[2]) if len(parts) > 2 else {}
        pipe = pipe.add(key, _builtins.SINGLE_INPUT[key], weight=weight, options=options)
    return pipe


def multi_pipeline(entries: Sequence[Any], *, name: str = "default") -> MultiPipeline:
    """Build a :class:`MultiPipeline` from built-in names over named inputs.

    Each entry is ``(name, weight, inputs)`` or ``(name, weight, inputs, {options})``, e.g.
    ``("kl", 0.1, ("student", "teacher"), {"direction": "reverse"})``. Names: ``kl``
    (:func:`~penwatch.kl_divergence`), ``js``, ``consistency``, and the one-input
    built-ins with a one-name ``inputs``.

    Example:
      >>> import penwatch as pw
      >>> pipe = pw.multi_pipeline([
      ...     ("kl", 0.1, ("student", "teacher")),
      ...     ("consistency", 0.2, ("clean", "noisy"), {"metric": "mse"})])
      >>> pipe.required_inputs
      ('clean', 'noisy', 'student', 'teacher')

    Raises:
      ValueError: unknown or duplicate names, malformed entries, bad weights or options.
    """
    where = "penwatch.multi_pipeline"
    _check_entries(where, entries)
    table = builtin_penalties(multi=True)
    form = "(name, weight, (input, ...)) or (name, weight, (input, ...), {options})"
    pipe = MultiPipeline(name=name)
    for entry in entries:
        parts = _entry_parts(where, entry, 4, form)
        key = _known(where, parts[0], table)
        if len(parts) < 3:
            raise ValueError(f"{where}: entry {key!r} needs its inputs: {form}, got {entry!r}")
        options = _options(where, key, parts[3]) if len(parts) > 3 else {}
        pipe = pipe.add(key, table[key], inputs=parts[2], weight=parts[1], options=options)
    return pipe
