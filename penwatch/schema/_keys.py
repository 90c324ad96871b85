"""The metric-key grammar (SPEC sections 3, 4 and 10) and the layout of a step's keys.

A step's metrics are a flat mapping of string keys:

* per penalty ``P``: ``P`` (raw value), ``P_weighted``, ``P_weight``, ``P_finite`` and,
  with input-gradient tracking, ``P_grad_norm``;
* per gradient term ``T`` (``base`` or a penalty name): ``T_param_grad_norm``,
  ``T_grad_share``, ``T_grad_cosine`` (SPEC section 4), ``T_update_share`` and
  ``T_suggested_weight`` (SPEC section 12);
* per gradient term ``T`` and top-level parameter group ``G``: ``T_param_grad_norm[G]``
  (:func:`group_key`);
* per pair of terms ``A``, ``B`` (``A`` before ``B`` in term order): ``grad_gram[A,B]``,
  the inner product of their *unweighted* parameter gradients (:func:`gram_key`);
* per captured activation ``C`` (``pw.capture``): ``C_dead_fraction`` (:func:`capture_key`);
* run level: :data:`RUN_KEYS` (``total``, ``loss``, ``base_loss``, ...);
* keys starting with ``_`` are reserved (not metrics): :data:`LEAF_COUNTS` carries the
  in-step per-leaf NaN/Inf counts.

This module is the only place that knows the suffixes. Builders name keys with
:func:`penalty_key` / :func:`term_key`; readers get a :class:`Layout` (parsed once per
distinct key tuple and cached) and read its slots.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Literal

__all__ = [
    "BASE_TERM",
    "CAPTURE_QUANTITIES",
    "GRAM",
    "LEAF_COUNTS",
    "PENALTY_QUANTITIES",
    "RUN_KEYS",
    "TERM_QUANTITIES",
    "Layout",
    "Slot",
    "Source",
    "capture_key",
    "gram_key",
    "group_key",
    "is_reserved",
    "layout_of",
    "penalty_key",
    "term_key",
]

PENALTY_QUANTITIES: Mapping[str, str] = {
    "value": "",
    "weighted": "_weighted",
    "weight": "_weight",
    "finite": "_finite",
    "grad_norm": "_grad_norm",
}
"""Per-penalty quantity -> key suffix (SPEC section 3). ``P_weight`` marks a penalty."""

TERM_QUANTITIES: Mapping[str, str] = {
    "param_grad_norm": "_param_grad_norm",
    "grad_share": "_grad_share",
    "grad_cosine": "_grad_cosine",
    "update_share": "_update_share",
    "suggested_weight": "_suggested_weight",
}
"""Per-term gradient-diagnostic quantity -> key suffix (SPEC sections 4 and 12).
``T_grad_share`` marks a term."""

CAPTURE_QUANTITIES: Mapping[str, str] = {"dead_fraction": "_dead_fraction"}
"""Per-capture (``pw.capture``) quantity -> key suffix (SPEC section 12)."""

GRAM = "grad_gram"
"""Prefix of the term Gram matrix entries: ``grad_gram[A,B]``."""

RUN_KEYS: tuple[str, ...] = (
    "total",
    "total_grad_norm",
    "base_loss",
    "loss",
    "grad_norm",
    "loss_finite",
    "grads_finite",
)
"""Run-level keys, in computation order."""

BASE_TERM = "base"
"""The gradient term of the task loss."""

LEAF_COUNTS = "_leaf_nonfinite"
"""Reserved key: ``{tree: {path: (nan_count, inf_count)}}`` computed inside the step
(a :class:`~penwatch.schema.TreeLeafCounts`: one array for every tree)."""

Source = Literal["penalty", "gradient", "loss", "total", "other"]

# Computation-order groups: a NaN propagates forwards along this order, so the earliest
# non-finite slot is the first offender (SPEC section 6).
_RAW, _WEIGHT, _WEIGHTED, _TOTAL, _BASE, _LOSS = 0, 1, 2, 3, 4, 5
_INPUT_GRAD, _PARAM_GRAD, _SHARE, _COSINE, _OTHER = 6, 7, 8, 9, 10
_PENALTY_GROUPS = {
    "value": _RAW,
    "weight": _WEIGHT,
    "weighted": _WEIGHTED,
    "finite": _WEIGHTED,
    "grad_norm": _INPUT_GRAD,
}
_TERM_GROUPS = {
    "param_grad_norm": _PARAM_GRAD,
    "grad_share": _SHARE,
    "grad_cosine": _COSINE,
    "update_share": _SHARE,
    "suggested_weight": _OTHER,
}
_RUN_GROUPS = {
    "total": (_TOTAL, "total"),
    "base_loss": (_BASE, "loss"),
    "loss": (_LOSS, "loss"),
    "loss_finite": (_LOSS, "loss"),
    "total_grad_norm": (_INPUT_GRAD, "gradient"),
    "grad_norm": (_PARAM_GRAD, "gradient"),
    "grads_finite": (_PARAM_GRAD, "gradient"),
}


def penalty_key(name: str, quantity: str = "value") -> str:
    """The flat key of a penalty quantity: ``penalty_key("l1", "weighted") == "l1_weighted"``."""
    return name + PENALTY_QUANTITIES[quantity]


def term_key(name: str, quantity: str) -> str:
    """The flat key of a gradient-term quantity: ``term_key("l1", "grad_share")``."""
    return name + TERM_QUANTITIES[quantity]


def group_key(name: str, group: str) -> str:
    """The key of a term's gradient norm over one parameter group:
    ``group_key("l1", "dense1") == "l1_param_grad_norm[dense1]"``."""
    return f"{term_key(name, 'param_grad_norm')}[{group}]"


def gram_key(a: str, b: str) -> str:
    """The key of one term Gram matrix entry ``⟨ĝ_a, ĝ_b⟩``: ``"grad_gram[base,l1]"``."""
    return f"{GRAM}[{a},{b}]"


def capture_key(name: str, quantity: str) -> str:
    """The flat key of a captured activation's quantity: ``"hidden1_dead_fraction"``."""
    return name + CAPTURE_QUANTITIES[quantity]


def is_reserved(key: str) -> bool:
    """Keys starting with ``_`` are not metrics."""
    return key.startswith("_")


@dataclasses.dataclass(frozen=True)
class Slot:
    """What one key of a layout means.

    Attributes:
      key: the flat key.
      name: the penalty or term it belongs to; None for run-level and unknown keys.
      quantity: a :data:`PENALTY_QUANTITIES` / :data:`TERM_QUANTITIES` name, or the key
        itself for run-level and unknown keys.
      scope: ``"penalty"``, ``"term"`` or ``"run"``.
      source: where a non-finite value here comes from (for reports).
      rank: computation order (group, index, position); smaller means computed earlier.
    """

    key: str
    name: str | None
    quantity: str
    scope: Literal["penalty", "term", "run"]
    source: Source
    rank: tuple[int, int, int]

    @property
    def penalty(self) -> str | None:
        """The penalty a non-finite value here is attributed to (None for ``base``)."""
        return None if self.name == BASE_TERM else self.name


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """The meaning of a step's keys, in order; one object per distinct key tuple.

    Attributes:
      keys: the metric keys (reserved ``_`` keys excluded), in record order.
      penalties: penalty names in pipeline order.
      terms: gradient-diagnostic terms, ``base`` first.
      slots: one :class:`Slot` per key, aligned with ``keys``.
      index: key -> position.
      groups: parameter groups with per-term gradient norms (:func:`group_key`), in
        key order.
      group_keys: ``(term, group) -> key`` of the per-group gradient norms.
      gram_keys: ``(term_a, term_b) -> key`` of the Gram matrix entries present (both
        orders map to the one key).
      captures: captured activations with ``C_dead_fraction``, in key order.
    """

    keys: tuple[str, ...]
    penalties: tuple[str, ...]
    terms: tuple[str, ...]
    slots: tuple[Slot, ...]
    index: Mapping[str, int]
    groups: tuple[str, ...] = ()
    group_keys: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)
    gram_keys: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)
    captures: tuple[str, ...] = ()

    def penalty_keys(self, name: str) -> dict[str, str]:
        """quantity -> key of one penalty's present quantities."""
        return {q: k for q, s in PENALTY_QUANTITIES.items() if (k := name + s) in self.index}

    def term_keys(self, name: str) -> dict[str, str]:
        """quantity -> key of one term's present quantities."""
        return {q: k for q, s in TERM_QUANTITIES.items() if (k := name + s) in self.index}

    @functools.cached_property
    def first_order(self) -> tuple[int, ...]:
        """Positions of the keys sorted by computation order (first offender first)."""
        return tuple(sorted(range(len(self.slots)), key=lambda i: self.slots[i].rank))


def layout_of(keys: Iterable[str], penalties: Iterable[str] | None = None) -> Layout:
    """The :class:`Layout` of a key sequence (cached: the same keys give the same object).

    Args:
      keys: metric keys in record order; reserved ``_`` keys are skipped.
      penalties: penalty names in pipeline order when known (``pw.Metrics`` carries
        them); None parses them from the keys (every penalty has a ``P_weight`` key), in
        key order.
    """
    return _layout(tuple(keys), None if penalties is None else tuple(penalties))


@functools.lru_cache(maxsize=512)
def _layout(keys: tuple[str, ...], penalties: tuple[str, ...] | None) -> Layout:
    keys = tuple(k for k in keys if not is_reserved(k))
    present = set(keys)
    if penalties is None:
        suffix = PENALTY_QUANTITIES["weight"]
        penalties = tuple(k[: -len(suffix)] for k in keys if k.endswith(suffix) and k != suffix)
    else:
        penalties = tuple(p for p in penalties if penalty_key(p, "weight") in present)
    share = TERM_QUANTITIES["grad_share"]
    terms = [k[: -len(share)] for k in keys if k.endswith(share) and k != share]
    terms = tuple(sorted(terms, key=lambda t: t != BASE_TERM))
    table: dict[str, tuple[str | None, str, str, Source, int, int]] = {}
    for i, t in enumerate(terms):
        for quantity, suffix in TERM_QUANTITIES.items():
            table[t + suffix] = (t, quantity, "term", "gradient", _TERM_GROUPS[quantity], i)
    for i, p in enumerate(penalties):
        for quantity, suffix in PENALTY_QUANTITIES.items():
            source: Source = "gradient" if quantity == "grad_norm" else "penalty"
            table.setdefault(
                p + suffix, (p, quantity, "penalty", source, _PENALTY_GROUPS[quantity], i)
            )
    term_set = set(terms)
    norm = TERM_QUANTITIES["param_grad_norm"]
    group_keys: dict[tuple[str, str], str] = {}
    gram_keys: dict[tuple[str, str], str] = {}
    captures: list[str] = []
    dead = CAPTURE_QUANTITIES["dead_fraction"]
    for key in keys:
        if key.endswith("]") and f"{norm}[" in key:
            term, _, group = key[:-1].rpartition(f"{norm}[")
            if term in term_set:
                group_keys[(term, group)] = key
                # scope "run": a term has one slot per quantity; groups are many
                table[key] = (term, "group_grad_norm", "run", "gradient", _PARAM_GRAD, 0)
        elif key.startswith(f"{GRAM}[") and key.endswith("]"):
            pair = _split_pair(key[len(GRAM) + 1 : -1], term_set)
            if pair is not None:
                gram_keys[pair] = gram_keys[pair[::-1]] = key
                table[key] = (None, GRAM, "run", "gradient", _PARAM_GRAD, len(terms))
        elif key.endswith(dead) and key != dead and key not in table:
            captures.append(key[: -len(dead)])
            table[key] = (key[: -len(dead)], "dead_fraction", "run", "other", _OTHER, 0)
    n_terms = len(terms)
    slots = []
    for position, key in enumerate(keys):
        if key in table:
            name, quantity, scope, source, group, index = table[key]
        elif key in _RUN_GROUPS:
            group, source = _RUN_GROUPS[key]
            name, quantity, scope = None, key, "run"
            index = n_terms if group == _PARAM_GRAD else len(penalties)
        else:
            name, quantity, scope, source, group, index = None, key, "run", "other", _OTHER, 0
        slots.append(Slot(key, name, quantity, scope, source, (group, index, position)))  # type: ignore[arg-type]
    return Layout(
        keys=keys,
        penalties=penalties,
        terms=terms,
        slots=tuple(slots),
        index={k: i for i, k in enumerate(keys)},
        groups=tuple(dict.fromkeys(g for _, g in group_keys)),
        group_keys=group_keys,
        gram_keys=gram_keys,
        captures=tuple(captures),
    )


def _split_pair(inner: str, terms: set[str]) -> tuple[str, str] | None:
    """``"a,b"`` -> ``(a, b)`` for known terms ``a`` and ``b`` (names may hold commas)."""
    for i, ch in enumerate(inner):
        if ch == "," and inner[:i] in terms and inner[i + 1 :] in terms:
            return inner[:i], inner[i + 1 :]
    return None
