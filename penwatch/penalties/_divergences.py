"""Divergences between distributions given as log-probabilities, and entropy.

All functions work per row over the last axis and reduce over the remaining (batch)
axes. Zero probabilities (``logprob = -inf``) give finite values *and* finite gradients:
masked entries are replaced by a harmless value *before* any log-domain op
(double ``where``), not only masked afterwards (see optax PR #1786 for the trap).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from penwatch import _checks
from penwatch.penalties import _common

P_FLOOR = 1e-10
"""Terms with ``p <= P_FLOOR`` contribute 0 to KL/JS."""

LOG_RATIO_CLIP = 100.0
"""``log p - log q`` is clipped to ``[-LOG_RATIO_CLIP, LOG_RATIO_CLIP]``."""

ENTROPY_LOGPROB_FLOOR = -50.0
"""Entropy terms with ``logprob <= ENTROPY_LOGPROB_FLOOR`` are masked."""

_LOG_P_FLOOR = math.log(P_FLOOR)


def kl_rows(p_lp: jax.Array, q_lp: jax.Array) -> jax.Array:
    """Per-row ``sum p * clip(log p - log q, ±100)`` with ``p <= 1e-10`` masked."""
    mask = p_lp > _LOG_P_FLOOR
    p_safe = jnp.where(mask, p_lp, 0.0)
    q_safe = jnp.where(mask, q_lp, 0.0)
    ratio = jnp.clip(p_safe - q_safe, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    terms = jnp.where(mask, jnp.exp(p_safe) * ratio, 0.0)
    return jnp.sum(terms, axis=-1)


def _prepare_pair(fn: str, p: ArrayLike, q: ArrayLike) -> tuple[jax.Array, jax.Array, object]:
    p = _common.as_float(fn, "p_logprobs", p)
    q = _common.as_float(fn, "q_logprobs", q)
    _checks.check_same_shape(fn, "p_logprobs", p, "q_logprobs", q)
    _checks.check_ndim(fn, "p_logprobs", p, min_ndim=1)
    dtype = jnp.result_type(p.dtype, q.dtype)
    return _common.upcast(p.astype(dtype)), _common.upcast(q.astype(dtype)), dtype


def kl_divergence(
    p_logprobs: ArrayLike,
    q_logprobs: ArrayLike,
    *,
    reduction: str = "mean",
    direction: str = "forward",
    symmetric: bool = False,
) -> jax.Array:
    r"""Kullback-Leibler divergence between two distributions given as log-probabilities.

    .. math::
      \mathrm{KL}(P \| Q) = \sum_k p_k \, \mathrm{clip}(\log p_k - \log q_k, -100, 100)

    per row over the last axis; terms with ``p_k <= 1e-10`` contribute 0, so zero
    probabilities (``-inf`` log-probabilities) give finite values and gradients.

    Args:
      p_logprobs: log-probabilities ``log P``, shape ``[..., n]``.
      q_logprobs: log-probabilities ``log Q``, same shape.
      reduction: over the batch (all but the last) axes: ``"mean"`` (default), ``"sum"``
        or ``"none"`` (per-row values of shape ``[...]``).
      direction: ``"forward"`` computes ``KL(P‖Q)``, ``"reverse"`` ``KL(Q‖P)``.
      symmetric: ``True`` gives ``(KL(P‖Q) + KL(Q‖P)) / 2`` and ignores ``direction``.

    Returns:
      A scalar (or per-row values) in the inputs' (common) floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.penalties import kl_divergence
      >>> p = jnp.log(jnp.array([0.5, 0.5]))
      >>> q = jnp.log(jnp.array([0.9, 0.1]))
      >>> round(float(kl_divergence(p, q)), 4)
      0.5108

    References:
      Kullback and Leibler, *On Information and Sufficiency*, 1951.
    """
    fn = "penwatch.kl_divergence"
    reduction = _common.check_reduction(fn, reduction)
    direction = _checks.check_choice(fn, "direction", direction, ("forward", "reverse"))
    symmetric = _checks.check_bool(fn, "symmetric", symmetric)
    p, q, dtype = _prepare_pair(fn, p_logprobs, q_logprobs)
    if symmetric:
        rows = 0.5 * (kl_rows(p, q) + kl_rows(q, p))
    elif direction == "reverse":
        rows = kl_rows(q, p)
    else:
        rows = kl_rows(p, q)
    return _common.reduce(rows, reduction).astype(dtype)


def js_rows(p_lp: jax.Array, q_lp: jax.Array) -> jax.Array:
    """Per-row Jensen-Shannon divergence with a log-space mixture."""
    # Where both are (numerically) zero the mixture is irrelevant (both KL terms are
    # masked); feed logaddexp harmless inputs there so its gradient stays finite.
    both_zero = (p_lp <= _LOG_P_FLOOR) & (q_lp <= _LOG_P_FLOOR)
    p_in = jnp.where(both_zero, 0.0, p_lp)
    q_in = jnp.where(both_zero, 0.0, q_lp)
    m_lp = jnp.logaddexp(p_in, q_in) - math.log(2.0)
    return 0.5 * (kl_rows(p_lp, m_lp) + kl_rows(q_lp, m_lp))


def js_divergence(
    p_logprobs: ArrayLike, q_logprobs: ArrayLike, *, reduction: str = "mean"
) -> jax.Array:
    r"""Jensen-Shannon divergence between two distributions given as log-probabilities.

    .. math::
      \mathrm{JS}(P, Q) = \tfrac12 \mathrm{KL}(P \| M) + \tfrac12 \mathrm{KL}(Q \| M),
      \quad M = \tfrac12 (P + Q)

    per row over the last axis, with ``log M = logaddexp(log P, log Q) - log 2`` computed
    in log space, and the masking of :func:`kl_divergence`. Symmetric and bounded by
    ``log 2`` (natural logarithm).

    Args:
      p_logprobs: log-probabilities ``log P``, shape ``[..., n]``.
      q_logprobs: log-probabilities ``log Q``, same shape.
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-row values).

    Returns:
      A scalar (or per-row values) in the inputs' floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.penalties import js_divergence
      >>> p = jnp.log(jnp.array([1.0, 0.0]))
      >>> q = jnp.log(jnp.array([0.0, 1.0]))
      >>> round(float(js_divergence(p, q)), 4)  # disjoint supports: log 2
      0.6931

    References:
      Lin, *Divergence Measures Based on the Shannon Entropy*, 1991.
    """
    fn = "penwatch.js_divergence"
    reduction = _common.check_reduction(fn, reduction)
    p, q, dtype = _prepare_pair(fn, p_logprobs, q_logprobs)
    return _common.reduce(js_rows(p, q), reduction).astype(dtype)


def entropy(
    logprobs: ArrayLike,
    *,
    mode: str = "penalty",
    reduction: str = "mean",
    normalize: bool = False,
    temperature: float = 1.0,
) -> jax.Array:
    r"""Shannon entropy of distributions given as log-probabilities, as a loss term.

    .. math::
      H(p) = -\sum_k p_k \log p_k

    per row over the last axis; terms with ``logprob <= -50`` are masked (finite values
    and gradients at ``-inf``).

    **Sign convention: the value is a term you add to the loss.** ``mode="penalty"``
    returns ``+H``: minimizing the loss lowers the entropy (confident predictions).
    ``mode="bonus"`` returns ``-H``: minimizing the loss raises the entropy
    (exploration, the RL "entropy bonus"). The Elixir NxPenalties library names the two
    modes the other way round; penwatch follows its README's stated intent ("penalty:
    minimize entropy", "bonus: maximize entropy").

    Args:
      logprobs: log-probabilities, shape ``[..., n]``.
      mode: ``"penalty"`` (``+H``, default) or ``"bonus"`` (``-H``).
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-row values).
      normalize: divide by ``log(n)`` so the entropy lies in ``[0, 1]`` (a single class
        has entropy 0).
      temperature: ``T > 0``; when not 1 the rows are re-normalized as
        ``log_softmax(logprobs / T)`` first (``T < 1`` sharpens, ``T > 1`` flattens).

    Returns:
      A scalar (or per-row values) in ``logprobs``'s floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.penalties import entropy
      >>> uniform = jnp.log(jnp.full((4,), 0.25))
      >>> round(float(entropy(uniform, normalize=True)), 4)
      1.0
      >>> round(float(entropy(uniform, mode="bonus", normalize=True)), 4)
      -1.0

    References:
      Shannon, *A Mathematical Theory of Communication*, 1948.
    """
    fn = "penwatch.entropy"
    mode = _checks.check_choice(fn, "mode", mode, ("penalty", "bonus"))
    reduction = _common.check_reduction(fn, reduction)
    normalize = _checks.check_bool(fn, "normalize", normalize)
    temperature = _checks.check_positive(fn, "temperature", temperature)
    x = _common.as_float(fn, "logprobs", logprobs)
    _checks.check_ndim(fn, "logprobs", x, min_ndim=1)
    lp = _common.upcast(x)
    if temperature != 1.0:
        lp = jax.nn.log_softmax(lp / temperature, axis=-1)
    rows = entropy_rows(lp)
    if normalize:
        n = lp.shape[-1]
        rows = rows / math.log(n) if n > 1 else jnp.zeros_like(rows)
    if mode == "bonus":
        rows = 0.0 - rows  # not -rows: a zero entropy stays +0.0
    return _common.reduce(rows, reduction).astype(x.dtype)


def entropy_mask(lp: jax.Array) -> jax.Array:
    """Terms that count: ``logprob > -50``, and NaN (so a NaN input stays visible)."""
    return ~(lp <= ENTROPY_LOGPROB_FLOOR)


def entropy_rows(lp: jax.Array) -> jax.Array:
    """Per-row ``-sum p log p`` with ``logprob <= -50`` masked (double where)."""
    mask = entropy_mask(lp)
    safe = jnp.where(mask, lp, 0.0)
    return jnp.sum(jnp.where(mask, -jnp.exp(safe) * safe, 0.0), axis=-1)
