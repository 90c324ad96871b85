"""Per-penalty input-gradient norms in one compiled pass: one forward and one backward each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from penwatch.penalties._closed_form import InputGrad, basis_array

__all__ = ["ClosedFormTerm", "fused_grad_norms", "grad_norms"]


def _accumulation_dtype(dtype: Any) -> Any:
    # Sums of squares of bf16/f16 gradients are accumulated in (at least) float32.
    return jnp.promote_types(dtype, jnp.float32)


# Small inputs: every sum of squares in one reduction over the gradients stacked as rows
# (kernel launches dominate there: on XLA:CPU, [256, 10] log-probabilities with five
# penalties went from 2.1x to 0.98x a value_and_grad). Large inputs: one reduction per
# gradient, since a reduction over a concatenation evaluates it element by element
# (3.6-4.2x on [1024, 256]). The crossover measured on XLA:CPU lies between 15k and 49k.
STACK_MAX_ELEMENTS = 1 << 14


def grad_norms(
    fns: Sequence[Callable[[Any], ArrayLike]],
    inputs: Any,
    *,
    weights: ArrayLike | None = None,
) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array | None]:
    r"""Values of scalar functions and the norms of their gradients, in one pass.

    One compiled pass (inside the caller's ``jit``): each :math:`f_i` is evaluated once,
    its VJP taken at cotangent 1 gives :math:`\nabla f_i(x)`, and the weighted total's
    gradient :math:`\sum_i w_i \nabla f_i(x)` is their combination:

    .. math::
      n_i = \lVert \nabla_x f_i(x) \rVert_2, \qquad
      n_{\mathrm{total}} = \Big\lVert \sum_i w_i \nabla_x f_i(x) \Big\rVert_2

    The total needs no separate backward pass. Each function's backward runs once (a VJP
    of the stacked vector ``vmap``-ed over the identity cotangents would run every
    function's backward ``k`` times, since the functions share no forward work). Norms
    run over every inexact (floating) leaf of ``inputs``
    together; integer/bool leaves are treated as constants. Norms are accumulated in at
    least float32.

    Args:
      fns: ``k >= 1`` functions, each mapping ``inputs`` to a scalar.
      inputs: an array or a pytree of arrays.
      weights: optional ``[k]`` weights for the combined norm.

    Returns:
      ``(values, norms, total_norm)``: the ``k`` values (each in its function's own dtype),
      a ``[k]`` array of gradient norms, and the norm of the weighted sum of the gradients
      (None when ``weights`` is None).

    Examples:
      >>> import jax.numpy as jnp
      >>> from penwatch.pipelines import grad_norms
      >>> x = jnp.array([3.0, 4.0])
      >>> values, norms, total = grad_norms(
      ...     [lambda x: jnp.sum(x**2), lambda x: jnp.sum(x)], x, weights=jnp.array([1.0, 0.0]))
      >>> [round(float(n), 4) for n in norms], round(float(total), 4)
      ([10.0, 1.4142], 10.0)
    """
    fns = tuple(fns)
    if not fns:
        raise ValueError("penwatch.pipelines.grad_norms: argument 'fns' must not be empty")
    k = len(fns)
    w = _check_weights(weights, k)
    values, grads, _ = _vjps(fns, inputs)
    norms = jnp.sqrt(_sums_of_squares(grads, w, _accumulation_dtype(jnp.result_type(*values))))
    if w is None:
        return tuple(values), norms, None
    return tuple(values), norms[:k], norms[k]


def _scalar(i: int, fn: Callable[[Any], ArrayLike]) -> Callable[[Any], jax.Array]:
    """``fn`` checked to return a scalar; integer/bool results become float32."""

    def f(inputs: Any) -> jax.Array:
        value = jnp.asarray(fn(inputs))
        if value.shape != ():
            raise ValueError(
                f"penwatch.pipelines.grad_norms: function {i} returned shape "
                f"{value.shape}; every function must return a scalar"
            )
        if not jnp.issubdtype(value.dtype, jnp.inexact):
            value = value.astype(jnp.float32)
        return value

    return f


def _vjps(
    fns: Sequence[Callable[[Any], ArrayLike]], inputs: Any
) -> tuple[list[jax.Array], list[list[jax.Array]], list[int]]:
    """Each function's value and its gradient on every floating leaf (one VJP each).

    Returns ``(values, grads, diff_pos)``: ``grads[i]`` lists function ``i``'s gradient
    on the floating leaves, whose positions among all leaves are ``diff_pos``.
    """
    leaves, treedef = jax.tree.flatten(inputs)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    diff_pos = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.inexact)]

    def bind(i: int, fn: Callable[[Any], ArrayLike]) -> Callable[[list[jax.Array]], jax.Array]:
        scalar = _scalar(i, fn)

        def f(diff: list[jax.Array]) -> jax.Array:
            full = list(leaves)
            for pos, leaf in zip(diff_pos, diff, strict=True):
                full[pos] = leaf
            return scalar(jax.tree.unflatten(treedef, full))

        return f

    # Each function's own VJP at cotangent 1: one forward and one backward per function,
    # all inside the caller's compiled program. (The VJP of the stacked vector vmapped
    # over the identity basis runs every function's backward once per basis row: k times
    # the work, measured 3.4x a value_and_grad with an orthogonality penalty.)
    values, grads = [], []
    for i, fn in enumerate(fns):
        value, vjp_fn = jax.vjp(bind(i, fn), [leaves[p] for p in diff_pos])
        (grad,) = vjp_fn(jnp.ones((), value.dtype))
        values.append(value)
        grads.append(grad)
    return values, grads, diff_pos


def _check_weights(weights: ArrayLike | None, k: int) -> jax.Array | None:
    if weights is None:
        return None
    w = jnp.asarray(weights)
    if w.shape != (k,):
        raise ValueError(
            f"penwatch.pipelines.grad_norms: argument 'weights' must have shape ({k},), "
            f"got {w.shape}"
        )
    return w


def _sums_of_squares(grads: list[list[jax.Array]], w: jax.Array | None, acc: Any) -> jax.Array:
    """``[k]`` (``[k + 1]`` with the weighted total) sums of squares of the gradients."""
    size = (len(grads) + (w is not None)) * sum(leaf.size for leaf in grads[0])
    if grads[0] and size <= STACK_MAX_ELEMENTS:
        return _stacked_sums_of_squares(grads, w, acc)
    return _separate_sums_of_squares(grads, w, acc)


def _stacked_sums_of_squares(
    grads: list[list[jax.Array]], w: jax.Array | None, acc: Any
) -> jax.Array:
    dtype = jnp.result_type(acc, *(leaf.dtype for g in grads for leaf in g))
    rows = [jnp.concatenate([leaf.astype(dtype).ravel() for leaf in g]) for g in grads]
    if w is not None:
        # the weighted total's gradient is the weighted sum: no extra backward pass
        rows.append(sum(w[i].astype(dtype) * row for i, row in enumerate(rows)))
    return jnp.sum(jnp.square(jnp.stack(rows)), axis=1)


def _separate_sums_of_squares(
    grads: list[list[jax.Array]], w: jax.Array | None, acc: Any
) -> jax.Array:
    k = len(grads)
    sq = [jnp.zeros((), acc) for _ in range(k + (w is not None))]
    for leaf in range(len(grads[0])):
        rows = [g[leaf].astype(jnp.promote_types(g[leaf].dtype, acc)) for g in grads]
        for i, row in enumerate(rows):
            sq[i] = sq[i] + jnp.sum(jnp.square(row))
        if w is not None:
            combined = sum(w[i].astype(row.dtype) * row for i, row in enumerate(rows))
            sq[k] = sq[k] + jnp.sum(jnp.square(combined))
    return jnp.stack(sq)


class ClosedFormTerm(NamedTuple):
    """A function whose gradient is known in closed form, for :func:`fused_grad_norms`.

    Attributes:
      fn: maps the inputs to a scalar (its value is taken from it, as any function's).
      leaf: the position, among the flattened inputs' leaves, of the one array the
        gradient lives on (zero on every other leaf).
      grad: maps that leaf to its :class:`~penwatch.penalties._closed_form.InputGrad`.
    """

    fn: Callable[[Any], ArrayLike]
    leaf: int
    grad: Callable[[jax.Array], InputGrad]


def fused_grad_norms(
    terms: Sequence[Callable[[Any], ArrayLike] | ClosedFormTerm],
    inputs: Any,
    *,
    weights: ArrayLike | None = None,
) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array | None]:
    r""":func:`grad_norms` where some functions' gradients are known in closed form.

    A :class:`ClosedFormTerm` gets its norm from its closed form (sums over its input,
    each fused with its element-wise expression: no backward pass, no materialized
    gradient); every plain function gets its own VJP, as in :func:`grad_norms`. The
    weighted total's gradient :math:`\sum_i w_i \nabla f_i` is reduced per input leaf
    in one expression: the closed-form gradients enter it as element-wise expressions
    (fused by XLA), the VJP gradients as the arrays they are. Same arguments and results
    as :func:`grad_norms`.

    Inputs small enough for :func:`grad_norms` to stack every gradient into one
    reduction (``(k + 1) * size <= STACK_MAX_ELEMENTS``) take that path instead: fewer
    kernels, which is what small inputs cost on XLA:CPU.
    """
    terms = tuple(terms)
    leaves = [jnp.asarray(leaf) for leaf in jax.tree.leaves(inputs)]
    k = len(terms)
    size = sum(leaf.size for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact))
    if (
        not any(isinstance(t, ClosedFormTerm) for t in terms)
        or (k + (weights is not None)) * size <= STACK_MAX_ELEMENTS
    ):
        # Tiny inputs are bound by the number of kernels, and grad_norms stacks every
        # gradient into one reduction there: on XLA:CPU, [256, 10] log-probabilities
        # with five element-wise penalties took 0.62-0.71x a value_and_grad that way
        # and 1.40-1.45x through the closed forms (more, smaller reductions).
        plain = [t.fn if isinstance(t, ClosedFormTerm) else t for t in terms]
        return grad_norms(plain, inputs, weights=weights)
    w = _check_weights(weights, k)
    closed = {i: t for i, t in enumerate(terms) if isinstance(t, ClosedFormTerm)}
    vjp_idx = [i for i in range(k) if i not in closed]
    values: list[Any] = [None] * k
    sq: list[Any] = [None] * k
    # per input leaf: the weighted gradients that enter the total, as arrays (VJPs and
    # the closed forms' own bases) and as summed coefficients of the shared bases
    parts: dict[int, list[jax.Array]] = {}
    shared: dict[int, dict[str, jax.Array]] = {}
    if vjp_idx:
        vjp_values, vjp_grads, diff_pos = _vjps([terms[i] for i in vjp_idx], inputs)
        acc = _accumulation_dtype(jnp.result_type(*vjp_values))
        vjp_sq = _sums_of_squares(vjp_grads, None, acc)
        for j, i in enumerate(vjp_idx):
            values[i], sq[i] = vjp_values[j], vjp_sq[j]
            if w is not None:
                for pos, g in zip(diff_pos, vjp_grads[j], strict=True):
                    g = g.astype(jnp.promote_types(g.dtype, acc))
                    parts.setdefault(pos, []).append(w[i].astype(g.dtype) * g)
    # per leaf: every closed form's sums and the square of the total's gradient
    forms = {}
    for i, t in closed.items():
        values[i] = _scalar(i, t.fn)(inputs)
        forms[i] = t.grad(leaves[t.leaf])
        if w is not None:
            for coef, basis in forms[i].parts():
                wc = w[i].astype(coef.dtype) * coef
                if isinstance(basis, str):
                    coefs = shared.setdefault(t.leaf, {})
                    coefs[basis] = coefs[basis] + wc if basis in coefs else wc
                else:
                    parts.setdefault(t.leaf, []).append(wc * basis)
    for pos, coefs in shared.items():
        y = next(forms[i].input for i, t in closed.items() if t.leaf == pos)
        parts.setdefault(pos, []).extend(c * basis_array(b, y) for b, c in coefs.items())
    acc = _accumulation_dtype(jnp.result_type(*values, *(s for s in sq if s is not None)))
    total_sq = jnp.zeros((), acc)
    for pos in sorted({t.leaf for t in closed.values()} | set(parts)):
        mine = [i for i, t in closed.items() if t.leaf == pos]
        own = {i: forms[i].terms() for i in mine}
        operands = [term for i in mine for term in own[i]]
        if pos in parts:
            combined = sum(parts[pos][1:], parts[pos][0])
            operands.append(jnp.square(combined.astype(acc)))
        sums = _sum_all(operands, acc)
        for i in mine:
            n = len(own[i])
            sq[i], sums = forms[i].finish(tuple(sums[:n])), sums[n:]
        if pos in parts:
            total_sq = total_sq + sums[0]
    norms = jnp.sqrt(jnp.stack([s.astype(acc) for s in sq]))
    if w is None:
        return tuple(values), norms, None
    return tuple(values), norms, jnp.sqrt(total_sq)


def _sum_all(operands: list[jax.Array], acc: Any) -> list[jax.Array]:
    """The sums of element-wise expressions over one input, one reduction each.

    XLA fuses each expression into its reduction (nothing input-sized is written but
    intermediates shared by several expressions, e.g. an ``exp``). One variadic
    ``lax.reduce`` over all of them would read the input once, but XLA:CPU emits it as
    a scalar loop: measured 1.98x a ``value_and_grad`` on ``[1024, 256]`` log-probs
    against 1.44x with separate reductions; a reduction over the expressions stacked
    along either axis was slower still.
    """
    return [jnp.sum(op.astype(acc)) for op in operands]
