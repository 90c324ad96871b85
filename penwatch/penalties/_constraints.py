"""Structural constraints: orthogonality of representations, consistency of pairs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from penwatch import _checks
from penwatch.penalties import _common, _divergences

ORTHOGONALITY_MODES = ("soft", "hard", "spectral")
ORTHOGONALITY_AXES = ("rows", "sequence", "vocabulary")
CONSISTENCY_METRICS = ("mse", "l1", "cosine", "kl")


def orthogonality_matrix(x: jax.Array, axis: str) -> jax.Array:
    """The matrix ``M`` whose rows are decorrelated, per SPEC's axis rules.

    1-D: one row ``[1, d]``. 2-D: ``rows``/``sequence`` as is, ``vocabulary`` transposed.
    3-D ``[batch, seq, dim]``: ``rows`` → ``[batch*seq, dim]``, ``sequence`` →
    ``[seq, batch*dim]``, ``vocabulary`` → ``[dim, batch*seq]``. Higher ranks: all but
    the last axis are flattened first, then the 2-D rules apply.
    """
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim == 3:
        b, s, d = x.shape
        if axis == "rows":
            return x.reshape(b * s, d)
        if axis == "sequence":
            return jnp.transpose(x, (1, 0, 2)).reshape(s, b * d)
        return x.reshape(b * s, d).T
    if x.ndim > 3:
        x = x.reshape(-1, x.shape[-1])
    return x.T if axis == "vocabulary" else x


def normalize_rows(m: jax.Array) -> jax.Array:
    """``m_i / max(‖m_i‖, 1e-8)``; an exactly-zero row stays 0 with a zero gradient."""
    norm = _common.floored_norm(m, axis=-1, keepdims=True)
    nonzero = jnp.any(m != 0, axis=-1, keepdims=True)
    return jnp.where(nonzero, m / norm, 0.0)


@jax.custom_jvp
def spectral_deviation(gram: jax.Array) -> jax.Array:
    """``max_i (λ_i(K) - 1)²`` for a symmetric ``K``, via ``eigh``, with a safe JVP.

    The JVP is ``2 (λ_k - 1) v_kᵀ dK v_k`` for the maximizing index ``k`` (Danskin /
    Hellmann-Feynman): no division by eigenvalue gaps, so it is finite at repeated
    eigenvalues (a valid subgradient at ties) and 0 at the optimum ``K = I``.
    """
    w = jnp.linalg.eigvalsh(gram)
    return jnp.max((w - 1.0) ** 2, axis=-1)


@spectral_deviation.defjvp
def _spectral_deviation_jvp(primals, tangents):
    (gram,), (dgram,) = primals, tangents
    w, v = jnp.linalg.eigh(gram)
    dev = (w - 1.0) ** 2
    k = jnp.argmax(dev, axis=-1)
    vk = jnp.take_along_axis(v, k[..., None, None], axis=-1)[..., 0]
    wk = jnp.take_along_axis(w, k[..., None], axis=-1)[..., 0]
    dlam = jnp.einsum("...i,...ij,...j->...", vk, dgram, vk)
    return jnp.max(dev, axis=-1), 2.0 * (wk - 1.0) * dlam


def orthogonality(
    x: ArrayLike, *, mode: str = "soft", normalize: bool = True, axis: str = "rows"
) -> jax.Array:
    r"""Orthogonality (decorrelation) penalty on the rows of a matrix built from ``x``.

    With ``M`` the matrix described below, optionally with L2-normalized rows
    (norm floor ``1e-8``), and ``G = M Mᵀ``:

    .. math::
      \mathrm{soft} = \sum_{i \ne j} G_{ij}^2, \quad
      \mathrm{hard} = \|G - I\|_F^2, \quad
      \mathrm{spectral} = \max_i (\lambda_i(G) - 1)^2

    ``spectral`` is the squared spectral norm of ``G - I``: 0 exactly when every singular
    value of ``M`` is 1. It is computed exactly with a symmetric eigensolver
    (``jnp.linalg.eigh``, in float32 for 16-bit inputs) on the smaller of the two Gram
    matrices ``M Mᵀ`` (n×n) and ``Mᵀ M`` (d×d), which share their non-zero eigenvalues;
    when ``n > d``, ``G`` also has the eigenvalue 0, which contributes 1. Its gradient
    is ``2 (λ_k - 1) v_kᵀ dG v_k`` for the maximizing eigenpair (a custom JVP), finite
    everywhere, including at ``G = I`` (where it is 0) and at repeated eigenvalues
    (first order: second derivatives go through the eigenvectors and are not finite at ties).
    ``soft`` and ``hard`` of normalized rows with ``n >= 2d`` (e.g. activations
    ``[batch*seq, dim]``) come from the ``d×d`` Gram ``Mᵀ M`` instead of the ``n×n`` one
    (the same value: ``‖M Mᵀ‖_F = ‖Mᵀ M‖_F``), ``n/d`` times less work. Their gradients
    take one matrix product back (custom JVPs: ``4 T M`` for the target ``T`` of ``G``,
    ``4 M Mᵀ M`` for ``‖Mᵀ M‖_F²``), where autodiff of the product takes two.

    Axis (how ``M`` is built): for a 3-D ``[batch, seq, dim]`` input ``rows`` →
    ``[batch*seq, dim]``, ``sequence`` → ``[seq, batch*dim]`` (decorrelate positions),
    ``vocabulary`` → ``[dim, batch*seq]`` (decorrelate dimensions). For 2-D input
    ``rows``/``sequence`` use it as is and ``vocabulary`` transposes it. A 1-D input is
    one row. Higher ranks: all but the last axis are flattened, then the 2-D rules apply.

    An exactly-zero row stays zero after normalization and gets a zero gradient.

    Args:
      x: array of rank >= 1.
      mode: ``"soft"`` (default), ``"hard"`` or ``"spectral"``.
      normalize: L2-normalize the rows of ``M`` first (default ``True``).
      axis: ``"rows"`` (default), ``"sequence"`` or ``"vocabulary"``.

    Returns:
      A scalar in ``x``'s floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.penalties import orthogonality
      >>> float(orthogonality(jnp.eye(3)))
      0.0
      >>> round(float(orthogonality(jnp.array([[1.0, 0.0], [1.0, 1.0]]))), 4)
      1.0

    References:
      Bansal, Chen and Wang, *Can We Gain More from Orthogonality Regularizations in
      Training Deep CNNs?*, 2018.
    """
    fn = "penwatch.orthogonality"
    mode = _checks.check_choice(fn, "mode", mode, ORTHOGONALITY_MODES)
    normalize = _checks.check_bool(fn, "normalize", normalize)
    axis = _checks.check_choice(fn, "axis", axis, ORTHOGONALITY_AXES)
    x = _common.as_float(fn, "x", x)
    _checks.check_ndim(fn, "x", x, min_ndim=1)
    m = orthogonality_matrix(_common.upcast(x), axis)
    if normalize:
        m = normalize_rows(m)
    n, d = m.shape
    if mode == "spectral":
        gram = m @ m.T if n <= d else m.T @ m
        out = spectral_deviation(gram)
        if n > d:
            out = jnp.maximum(out, 1.0)
        return out.astype(x.dtype)
    if normalize and n >= 2 * d:
        return from_feature_gram(m, mode).astype(x.dtype)
    return from_row_gram(m, mode).astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def from_row_gram(m: jax.Array, mode: str) -> jax.Array:
    """``soft``/``hard`` of the rows of ``m`` by their definition, from ``G = M Mᵀ``.

    Its JVP is ``4 Σ (T M) ⊙ dM`` with ``T`` the (symmetric) target, ``G`` off its
    diagonal or ``G - I``: one ``n×n×d`` product back instead of autodiff's two.
    """
    return jnp.sum(_row_target(m, mode) ** 2)


@from_row_gram.defjvp
def _from_row_gram_jvp(
    mode: str, primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (m,), (dm,) = primals, tangents
    target = _row_target(m, mode)
    return jnp.sum(target**2), 4.0 * jnp.sum((target @ m) * dm)


def _row_target(m: jax.Array, mode: str) -> jax.Array:
    g = m @ m.T
    eye = jnp.eye(m.shape[0], dtype=g.dtype)
    return g * (1.0 - eye) if mode == "soft" else g - eye


def from_feature_gram(m: jax.Array, mode: str) -> jax.Array:
    """``soft``/``hard`` of unit (or zero) rows from the ``d×d`` Gram ``Mᵀ M``, for
    ``n >= 2d`` rows.

    ``‖M Mᵀ‖_F² = tr(M Mᵀ M Mᵀ) = ‖Mᵀ M‖_F²`` and ``G_ii = ‖m_i‖²``, so
    ``soft = ‖Mᵀ M‖_F² - Σ_i G_ii²`` and ``hard = ‖Mᵀ M‖_F² - 2 Σ_i G_ii + n``:
    ``n d²`` multiply-adds forward and back instead of ``n² d``, and no ``n×n`` matrix
    (value and gradient ≈ 8x faster on ``[4096, 512]`` on XLA:CPU). The subtraction costs
    precision in proportion to ``‖G‖_F² / soft``: with ``k`` unit rows
    ``soft >= k²/d - k``, so at most a factor 2 when ``k >= 2d``; with many zero rows the
    absolute error stays at about ``eps * k`` (float32: 1e-4 at ``k = 1000``), and the
    result is clamped at 0 (docs/penalties.md).
    """
    n = m.shape[0]
    frobenius = gram_frobenius(m)
    diag = jnp.sum(m * m, axis=1)
    if mode == "soft":
        out = frobenius - jnp.sum(diag * diag)
    else:
        out = frobenius - 2.0 * jnp.sum(diag) + n
    return jnp.maximum(out, 0.0)


@jax.custom_jvp
def gram_frobenius(m: jax.Array) -> jax.Array:
    """``‖Mᵀ M‖_F²``, whose JVP ``4 Σ (M C) ⊙ dM`` (``C = Mᵀ M``) takes one ``n×d×d``
    product back instead of autodiff's two."""
    c = m.T @ m
    return jnp.sum(c * c)


@gram_frobenius.defjvp
def _gram_frobenius_jvp(
    primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (m,), (dm,) = primals, tangents
    c = m.T @ m
    return jnp.sum(c * c), 4.0 * jnp.sum((m @ c) * dm)


def consistency(
    a: ArrayLike, b: ArrayLike, *, metric: str = "mse", reduction: str = "mean"
) -> jax.Array:
    r"""Consistency penalty between paired outputs ``a`` and ``b`` (same shape).

    .. math::
      \mathrm{mse} = \mathrm{reduce}((a-b)^2), \quad
      \mathrm{l1} = \mathrm{reduce}(|a-b|), \quad
      \mathrm{cosine} = \mathrm{reduce}_i\Big(1 - \frac{a_i \cdot b_i}
        {\max(\|a_i\|, 10^{-8}) \max(\|b_i\|, 10^{-8})}\Big)

    ``mse``/``l1`` are element-wise; ``cosine`` works per row over the last axis (a 1-D
    input is one row; an exactly-zero vector has cosine 0 and a zero gradient);
    ``kl`` is the symmetric KL of log-probabilities per row with the masking and
    clipping of :func:`kl_divergence`.

    Args:
      a: array of rank >= 1 (log-probabilities for ``metric="kl"``).
      b: array of the same shape.
      metric: ``"mse"`` (default), ``"l1"``, ``"cosine"`` or ``"kl"``.
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (element-wise values for
        ``mse``/``l1``, per-row values for ``cosine``/``kl``).

    Returns:
      A scalar (or the unreduced values) in the inputs' floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.penalties import consistency
      >>> float(consistency(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0])))
      2.0
      >>> float(consistency(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), metric="cosine"))
      1.0

    References:
      Sajjadi, Javanmardi and Tasdizen, *Regularization With Stochastic Transformations
      and Perturbations for Deep Semi-Supervised Learning*, 2016.
    """
    fn = "penwatch.consistency"
    metric = _checks.check_choice(fn, "metric", metric, CONSISTENCY_METRICS)
    reduction = _common.check_reduction(fn, reduction)
    a = _common.as_float(fn, "a", a)
    b = _common.as_float(fn, "b", b)
    _checks.check_same_shape(fn, "a", a, "b", b)
    if metric in ("cosine", "kl"):
        _checks.check_ndim(fn, "a", a, min_ndim=1)
    dtype = jnp.result_type(a.dtype, b.dtype)
    a = _common.upcast(a.astype(dtype))
    b = _common.upcast(b.astype(dtype))
    if metric == "mse":
        values = (a - b) ** 2
    elif metric == "l1":
        values = _common.abs_(a - b)
    elif metric == "cosine":
        values = 1.0 - cosine_rows(a, b)
    else:
        values = 0.5 * (_divergences.kl_rows(a, b) + _divergences.kl_rows(b, a))
    return _common.reduce(values, reduction).astype(dtype)


def cosine_rows(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-row cosine similarity with norm floors; 0 (zero gradient) for zero vectors."""
    na = _common.floored_norm(a, axis=-1)
    nb = _common.floored_norm(b, axis=-1)
    nonzero = jnp.any(a != 0, axis=-1) & jnp.any(b != 0, axis=-1)
    cos = jnp.sum(a * b, axis=-1) / (na * nb)
    return jnp.where(nonzero, cos, 0.0)
