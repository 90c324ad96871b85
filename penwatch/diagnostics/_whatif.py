"""What-if reweighting and weight suggestions from the term Gram matrix (SPEC section 12).

With unweighted per-term gradients ``ĝ_i`` (``ĝ_0`` the task's, weight 1) and weights
``w``, the total gradient is ``g(w) = Σ_i w_i ĝ_i``; every SPEC §4 figure under new weights
follows from the Gram matrix ``G_ij = ⟨ĝ_i, ĝ_j⟩`` alone:

.. math::
    ⟨g_i, g⟩ = w_i (G w)_i,\\quad ‖g‖^2 = w^T G w,\\quad ‖g_i‖ = |w_i| \\sqrt{G_{ii}},\\quad
    \\cos(g_i, g_0) = \\operatorname{sign}(w_i) G_{i0} / \\sqrt{G_{ii} G_{00}}

Host-side NumPy (float64): no rerun, no device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from penwatch import _checks
from penwatch.schema import BASE_TERM, StepRecord, layout_of, penalty_key, term_key
from penwatch.schema import thresholds as th

__all__ = ["Suggestion", "WhatIf", "suggest_weights", "suggested_weight_metrics", "what_if"]


@dataclasses.dataclass(frozen=True)
class WhatIf:
    """The SPEC §4 figures of one diagnostics step under the given weights.

    Attributes:
      terms: term names, ``base`` first (the Gram matrix order).
      weights: ``term -> weight`` used (``base`` is 1).
      grad_share: ``term -> ⟨g_i, g⟩ / ‖g‖²`` (0 for all terms when ``g = 0``).
      grad_cosine: ``term -> cos(g_i, g_0)`` (0 when either norm is 0; 1 for a nonzero base).
      param_grad_norm: ``term -> ‖g_i‖``.
      grad_norm: ``‖g‖``.
      pull: ``term -> -⟨g_i, g_0⟩ / ‖g_0‖²``: the fraction of the task gradient that the
        term cancels along the task direction (0 for the base; > 1: it pulls past it).
    """

    terms: tuple[str, ...]
    weights: dict[str, float]
    grad_share: dict[str, float]
    grad_cosine: dict[str, float]
    param_grad_norm: dict[str, float]
    grad_norm: float
    pull: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """What :func:`suggest_weights` found.

    Attributes:
      weights: ``penalty -> suggested weight`` (every term but ``base``).
      feasible: whether the suggestion meets every band.
      reason: why not, in words (empty when feasible).
      changed: penalties whose weight changed.
      result: the :class:`WhatIf` figures under the suggested weights.
    """

    weights: dict[str, float]
    feasible: bool
    reason: str
    changed: tuple[str, ...]
    result: WhatIf


def _gram_of(
    fn: str, record_or_gram: Any, terms: Sequence[str] | None
) -> tuple[tuple[str, ...], np.ndarray, dict[str, float]]:
    """``(terms, G, current weights)`` from a record, ``(terms, G)`` or an array."""
    current: dict[str, float] = {}
    if isinstance(record_or_gram, StepRecord):
        found = record_or_gram.gram()
        if found is None:
            raise ValueError(
                f"{fn}: the record of step {record_or_gram.step} holds no complete term Gram "
                "matrix (grad_gram[a,b] keys); it is written at diagnostics steps only"
            )
        names, gram = found
        for t in names:
            w = record_or_gram.values.get(penalty_key(t, "weight"))
            current[t] = 1.0 if t == BASE_TERM or w is None else float(w)
    elif isinstance(record_or_gram, tuple) and len(record_or_gram) == 2 and terms is None:
        names, gram = record_or_gram
    else:
        names, gram = terms, record_or_gram
        if names is None:
            raise ValueError(
                f"{fn}: pass terms=(base, ...) with a bare Gram matrix (or a (terms, G) "
                "tuple or a StepRecord)"
            )
    g = np.asarray(gram, dtype=np.float64)
    names = tuple(str(n) for n in names)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] != len(names) or not names:
        raise ValueError(
            f"{fn}: the Gram matrix must be square with one row per term ({len(names)} "
            f"terms), got shape {g.shape}"
        )
    if names[0] != BASE_TERM or len(set(names)) != len(names):
        raise ValueError(
            f"{fn}: terms must be distinct with {BASE_TERM!r} first, got {list(names)}"
        )
    if not np.all(np.isfinite(g)):
        raise ValueError(f"{fn}: the Gram matrix has non-finite entries")
    for t in names:
        current.setdefault(t, 1.0)
    return names, g, current


def _weights(
    fn: str, names: tuple[str, ...], weights: Any, current: dict[str, float]
) -> np.ndarray:
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(
                f"{fn}: argument 'weights' names unknown terms {unknown}; terms are {list(names)}"
            )
        merged = {**current, **{str(k): v for k, v in weights.items()}}
        w = [merged[t] for t in names]
    else:
        w = list(np.asarray(weights, dtype=np.float64).reshape(-1))
        if len(w) != len(names):
            raise ValueError(
                f"{fn}: argument 'weights' must be a mapping term -> weight or one weight "
                f"per term ({len(names)}, base first), got {len(w)}"
            )
    out = np.asarray(w, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{fn}: argument 'weights' must be finite, got {out.tolist()}")
    if out[0] != 1.0:
        raise ValueError(f"{fn}: the base term's weight is 1 by definition, got {out[0]}")
    return out


def _figures(names: tuple[str, ...], g: np.ndarray, w: np.ndarray) -> WhatIf:
    gw = g @ w  # ⟨ĝ_i, g⟩
    dots = w * gw  # ⟨g_i, g⟩
    gg = float(w @ gw)
    shares = dots / gg if gg > 0 else np.zeros_like(dots)
    sq = np.maximum(np.diagonal(g), 0.0)
    norms = np.abs(w) * np.sqrt(sq)
    denom = np.sqrt(sq * sq[0])
    cos = np.where(denom > 0, np.sign(w) * g[:, 0] / np.where(denom > 0, denom, 1.0), 0.0)
    cos = np.clip(cos, -1.0, 1.0)
    pull = -w * g[:, 0] / g[0, 0] if g[0, 0] > 0 else np.zeros_like(w)
    pull[0] = 0.0
    return WhatIf(
        terms=names,
        weights=dict(zip(names, w.tolist(), strict=True)),
        grad_share=dict(zip(names, shares.tolist(), strict=True)),
        grad_cosine=dict(zip(names, cos.tolist(), strict=True)),
        param_grad_norm=dict(zip(names, norms.tolist(), strict=True)),
        grad_norm=math.sqrt(max(gg, 0.0)),
        pull=dict(zip(names, pull.tolist(), strict=True)),
    )


def what_if(record_or_gram: Any, weights: Any, *, terms: Sequence[str] | None = None) -> WhatIf:
    """The shares, cosines and norms one diagnostics step would have had under ``weights``.

    Exact, because the total gradient is linear in the weights: ``g(w) = Σ_i w_i ĝ_i``
    (see the module docstring for the formulas). Nothing is rerun.

    Args:
      record_or_gram: a :class:`~penwatch.schema.StepRecord` of a diagnostics step (its
        ``grad_gram[a,b]`` entries and current ``P_weight`` s), a ``(terms, G)`` tuple, or
        a ``[K, K]`` Gram matrix with ``terms``.
      weights: ``{term: weight}`` (unlisted terms keep their current weight, 1 for a bare
        matrix) or a sequence of ``K`` weights, base first (the base's must be 1).
      terms: the term names, base first, for a bare matrix.

    Returns:
      A :class:`WhatIf`.
    """
    fn = "penwatch.diagnostics.what_if"
    names, g, current = _gram_of(fn, record_or_gram, terms)
    return _figures(names, g, _weights(fn, names, weights, current))


def _largest_root(a: float, b: float, c: float) -> float:
    """The larger real root of ``a x² + b x + c`` (``a > 0``), or -inf without one."""
    disc = b * b - 4 * a * c
    if disc < 0:
        return -math.inf
    return (-b + math.sqrt(disc)) / (2 * a)


def suggest_weights(
    record_or_gram: Any,
    weights: Any = None,
    *,
    terms: Sequence[str] | None = None,
    penalty_max: float = th.SUGGEST_PENALTY_MAX_SHARE,
    base_min: float = th.SUGGEST_BASE_MIN_SHARE,
    max_rounds: int = 64,
) -> Suggestion:
    """Weights near the current ones that bring every penalty into the target band.

    The band (SPEC §12): every penalty's gradient share ``≤ penalty_max``, the base's
    share ``≥ base_min``, and every penalty's pull on the task ``-⟨g_i, g_0⟩/‖g_0‖² ≤
    penalty_max`` (a penalty may cancel at most that fraction of the task gradient along
    its direction — the balance case that shares alone cannot see). Advisory.

    Only lowering weights can enter the band, so weights only go down, as little as
    possible in log space: each penalty out of band is lowered, in closed form, to the
    largest weight at which its own share and pull hold given the others (a quadratic and
    a linear inequality in its weight); while the base's share is below ``base_min``, all
    penalties are scaled by the largest common factor that restores it (a quadratic in
    the factor). Rounds repeat until nothing moves. Penalties in band keep their weight;
    penalties of weight ``≤ 0`` are left as they are.

    Args:
      record_or_gram: as in :func:`what_if`.
      weights: the current weights (mapping or sequence as in :func:`what_if`); None:
        the record's ``P_weight`` s (1 for a bare matrix).
      terms: term names for a bare matrix.
      penalty_max: the largest share and pull allowed to a penalty, in ``[0, 1)``.
      base_min: the smallest share required of the base term, in ``(0, 1]``.
      max_rounds: rounds before giving up (reported as infeasible).

    Returns:
      A :class:`Suggestion`; ``feasible=False`` with the reason when no lowering of the
      weights meets the band (e.g. the task gradient is zero).
    """
    fn = "penwatch.diagnostics.suggest_weights"
    penalty_max = _checks.check_in_range(fn, "penalty_max", penalty_max, 0.0, 1.0)
    base_min = _checks.check_in_range(fn, "base_min", base_min, 0.0, 1.0)
    max_rounds = _checks.check_int(fn, "max_rounds", max_rounds, min=1)
    if penalty_max >= 1.0 or base_min <= 0.0:
        raise ValueError(
            f"{fn}: need 0 <= penalty_max < 1 and 0 < base_min <= 1, got "
            f"penalty_max={penalty_max}, base_min={base_min}"
        )
    names, g, current = _gram_of(fn, record_or_gram, terms)
    w0 = _weights(fn, names, {} if weights is None else weights, current)
    w = w0.copy()
    movable = [i for i in range(1, len(names)) if w[i] > 0]
    g00 = g[0, 0]
    if g00 <= 0:
        return _suggestion(
            names,
            w0,
            w0,
            _figures(names, g, w0),
            False,
            "the task gradient is zero at this step: no weights can give the base term a share",
        )
    diag = np.diagonal(g).tolist()
    col0 = g[:, 0].tolist()
    for _ in range(max_rounds):
        moved = False
        gw = g @ w  # ⟨ĝ_j, g⟩, updated in place as weights move
        quad = float(w @ gw)  # ‖g‖²
        for i in movable:
            a, wi, gwi = diag[i], float(w[i]), float(gw[i])
            if wi == 0 or a <= 0:
                continue  # lowered to 0 already, or a dead term: nothing to lower
            b = gwi - wi * a  # ⟨ĝ_i, h⟩, h = g - w_i ĝ_i
            c = quad - 2 * wi * gwi + wi * wi * a  # ‖h‖²
            # share_i(x) <= s  <=>  (1-s) a x² + (1-2s) b x - s c <= 0
            limit = _largest_root(
                (1 - penalty_max) * a, (1 - 2 * penalty_max) * b, -penalty_max * c
            )
            if col0[i] < 0:  # pull_i(x) = -x G_i0 / G_00 <= s
                limit = min(limit, penalty_max * g00 / -col0[i])
            if wi > limit * (1 + 1e-12):
                new = max(limit, 0.0) * (1 - 1e-9)
                step = new - wi
                quad += 2 * step * gwi + step * step * a
                gw += step * g[:, i]
                w[i] = new
                moved = True
        if quad > 0 and gw[0] / quad < base_min:
            scale = _common_scale(g, w, movable, base_min)
            if scale is None:
                break
            w[movable] *= scale
            moved = True
        if not moved:
            break
    result = _figures(names, g, w)
    broken = _broken(result, names, penalty_max, base_min)
    return _suggestion(names, w0, w, result, not broken, "; ".join(broken))


def _common_scale(
    g: np.ndarray, w: np.ndarray, movable: list[int], base_min: float
) -> float | None:
    """The largest ``λ ∈ (0, 1]`` with the base share ``≥ base_min`` once the movable
    weights are scaled by ``λ``, or None if there is none.

    With ``g = v + λ u`` (``u`` the movable terms' part) the condition is the quadratic
    ``m‖u‖² λ² + (2m⟨u, v⟩ - ⟨g_0, u⟩) λ + m‖v‖² - ⟨g_0, v⟩ ≤ 0``.
    """
    mask = np.zeros_like(w)
    mask[movable] = 1.0
    wu, wv = w * mask, w * (1 - mask)
    gu, gv = g @ wu, g @ wv
    a = base_min * float(wu @ gu)
    b = 2 * base_min * float(wu @ gv) - gu[0]
    c = base_min * float(wv @ gv) - gv[0]
    if a <= 0:
        return None
    disc = b * b - 4 * a * c
    if disc < 0:
        return None
    lo, hi = (-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)
    lam = min(hi, 1.0) * (1 - 1e-9)
    if lam <= 0 or lam < lo:
        return None
    return lam


def _broken(
    result: WhatIf, names: tuple[str, ...], penalty_max: float, base_min: float
) -> list[str]:
    tol = 1e-9
    broken = []
    if result.grad_share[BASE_TERM] < base_min - tol:
        broken.append(f"the base share stays {result.grad_share[BASE_TERM]:.3g} < {base_min:g}")
    for t in names[1:]:
        if result.grad_share[t] > penalty_max + tol:
            broken.append(f"{t}'s share stays {result.grad_share[t]:.3g} > {penalty_max:g}")
        if result.pull[t] > penalty_max + tol:
            broken.append(f"{t}'s pull on the task stays {result.pull[t]:.3g} > {penalty_max:g}")
    return broken


def _suggestion(
    names: tuple[str, ...],
    w0: np.ndarray,
    w: np.ndarray,
    result: WhatIf,
    feasible: bool,
    reason: str,
) -> Suggestion:
    changed = tuple(t for t, a, b in zip(names[1:], w0[1:], w[1:], strict=True) if a != b)
    return Suggestion(
        weights=dict(zip(names[1:], w[1:].tolist(), strict=True)),
        feasible=feasible,
        reason="" if feasible else (reason or "no lowering of the weights meets the band"),
        changed=changed,
        result=result,
    )


def suggested_weight_metrics(values: Mapping[str, float]) -> dict[str, float]:
    """``<penalty>_suggested_weight`` for a step's scalar values holding a Gram matrix.

    Empty when the values hold no complete Gram matrix or no feasible suggestion exists
    (a NaN would read as a non-finite metric); the monitor adds these to the record.
    """
    layout = layout_of(values)
    terms, keys = layout.terms, layout.gram_keys
    if len(terms) < 2 or any((a, b) not in keys for a in terms for b in terms):
        return {}
    gram = np.array([[values[keys[(a, b)]] for b in terms] for a in terms], dtype=np.float64)
    if not np.all(np.isfinite(gram)):
        return {}
    current = {t: float(values.get(penalty_key(t, "weight"), 1.0)) for t in terms[1:]}
    if not all(math.isfinite(v) for v in current.values()):
        return {}
    found = suggest_weights((terms, gram), current)
    if not found.feasible:
        return {}
    return {term_key(t, "suggested_weight"): w for t, w in found.weights.items()}
