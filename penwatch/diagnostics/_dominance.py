"""Which term of the loss drives the parameter update? (SPEC section 4).

For a loss ``L = L_0 + Σ_i T_i`` (task loss ``L_0``, weighted penalty terms ``T_i``) with
per-term parameter gradients ``g_i`` and total gradient ``g = Σ_j g_j``, this module reports
per term its gradient norm, its additive share of the update and its cosine with the task
gradient — all terms' gradients from **one** forward pass (``jax.vjp`` of the stacked
term vector) whose VJP is applied to the identity cotangents, ``vmap``-ed into one batched
backward pass (or one after the other on CPU, see :func:`_backward`); parameter-only
terms (L1/L2/elastic net of the weights) are added in closed form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from penwatch.diagnostics._closed_form import ParamTerm, _zero_grad
from penwatch.schema import Metrics, gram_key, group_key, term_key

PyTree = Any
TermsFn = Callable[[PyTree], Any]
"""``params -> (base_loss, {name: weighted_term})`` (with ``has_aux``: ``(that, aux)``)."""

BASE = "base"
PAIRWISE_KEY = "pairwise_cosine"
_HIGHEST = jax.lax.Precision.HIGHEST
_BACKWARD: str | None = None
"""Force ``"vmap"`` or ``"loop"`` (tests); ``None`` picks by backend, see ``_backward``."""


def _backward() -> str:
    """How the per-term backward passes run from the one forward pass's VJP.

    ``"vmap"``: the VJP ``vmap``-ed over the identity cotangents — one batched backward
    pass (larger kernels: the better choice on accelerators). ``"loop"``: the same VJP
    (same residuals, forward traced once) applied to each cotangent in turn — on XLA:CPU
    about 5-15 % faster for small MLPs (measured on the ``make bench`` machine), since
    the batched kernels do not parallelize better there.
    """
    if _BACKWARD is not None:
        return _BACKWARD
    return "loop" if jax.default_backend() == "cpu" else "vmap"


class DiagnosticsResult(NamedTuple):
    """What :func:`value_and_grad_with_diagnostics` returns (a pytree of device arrays).

    Attributes:
      loss: the total loss ``L_0 + Σ_i T_i`` (model terms and parameter terms).
      values: each term's value by name: ``"base"`` first, then every other term
        (model-dependent and parameter-only) sorted by name.
      grads: the total gradient ``g`` (shaped like ``params``), ready for an optimizer.
      metrics: the diagnostics, as from :func:`gradient_diagnostics` (a ``pw.Metrics``).
      aux: ``terms_fn``'s auxiliary output with ``has_aux=True``, else ``None``.
    """

    loss: jax.Array
    values: dict[str, jax.Array]
    grads: PyTree
    metrics: Metrics
    aux: Any = None


def gradient_diagnostics(
    terms_fn: TermsFn,
    params: PyTree,
    *,
    param_terms: Mapping[str, ParamTerm] | None = None,
    pairwise: bool = False,
    weights: Mapping[str, Any] | None = None,
    preconditioner: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Metrics:
    """Per-term parameter-gradient norms, additive shares and cosines, in one pass.

    With base (task) loss ``L_0``, weighted terms ``T_i`` and ``g_i = ∇_θ T_i``,
    ``g = Σ_j g_j``:

    .. math::
        \\mathrm{grad\\_norm}_i = \\lVert g_i \\rVert,\\quad
        \\mathrm{grad\\_share}_i = \\frac{\\langle g_i, g \\rangle}{\\lVert g \\rVert^2},\\quad
        \\mathrm{grad\\_cosine}_i = \\frac{\\langle g_i, g_0 \\rangle}
            {\\lVert g_i \\rVert \\lVert g_0 \\rVert}

    Shares sum to 1; a share above 1 means the term overshoots while others cancel it, a
    negative share (or cosine) means it pushes against the update (the task). Zero norms
    give shares and cosines of 0, never NaN. The model-dependent terms' gradients come
    from one forward pass and its VJP at the identity cotangents (batched with ``vmap`` on
    accelerators, in turn on CPU); ``param_terms`` add their closed-form
    gradients without any backward pass. Jit-able; wrap it in ``jax.jit`` (with
    ``terms_fn`` fixed) to run it every N steps.

    Args:
      terms_fn: ``params -> (base_loss, {name: weighted_term})``, scalars; the terms that
        depend on the parameters through the model (e.g. an entropy penalty of outputs).
      params: the parameter pytree (floating leaves; other leaves are ignored).
      param_terms: ``{name: term}`` of parameter-only terms from :func:`l1_term`,
        :func:`l2_term`, :func:`elastic_net_term` (weights are data: no recompiles).
      pairwise: also return the ``[T, T]`` matrix of cosines between all terms.
      weights: the weights inside ``terms_fn``'s terms, to unweight the Gram matrix
        (see :func:`value_and_grad_with_diagnostics`).
      preconditioner: a diagonal preconditioner for ``<t>_update_share``.

    Returns:
      A ``pw.Metrics`` (an immutable mapping of device arrays, packed one buffer
      per dtype; ``dict(m)`` gives a plain dict). Per term ``<t>`` (``base``, the
      names of ``terms_fn``'s terms and of ``param_terms``, which must be distinct):
      ``"<t>_param_grad_norm"``,
      ``"<t>_grad_share"``, ``"<t>_grad_cosine"`` (scalars); with ``pairwise=True`` also
      ``"pairwise_cosine"``, a ``[T, T]`` matrix whose rows and columns are ``base`` then
      the other terms sorted by name (:func:`term_names` gives that order); and the
      SPEC §12 figures of :func:`value_and_grad_with_diagnostics` (``grad_gram[a,b]``,
      ``<t>_param_grad_norm[<group>]``, ``<t>_update_share`` with a preconditioner).

    Example:
      >>> import jax.numpy as jnp, penwatch as pw
      >>> def terms(p):
      ...     return jnp.sum((p["w"] - 1.0) ** 2), {"pull": 0.1 * jnp.sum(p["w"] ** 2)}
      >>> m = pw.gradient_diagnostics(terms, {"w": jnp.zeros(3)})
      >>> float(m["base_grad_share"]), float(m["pull_grad_share"])
      (1.0, 0.0)
    """
    return value_and_grad_with_diagnostics(
        terms_fn,
        params,
        param_terms=param_terms,
        pairwise=pairwise,
        weights=weights,
        preconditioner=preconditioner,
    ).metrics


def value_and_grad_with_diagnostics(
    terms_fn: TermsFn,
    params: PyTree,
    *,
    param_terms: Mapping[str, ParamTerm] | None = None,
    pairwise: bool = False,
    has_aux: bool = False,
    weights: Mapping[str, Any] | None = None,
    gram: bool | None = None,
    groups: bool = True,
    preconditioner: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> DiagnosticsResult:
    """Total loss, total gradient and :func:`gradient_diagnostics`, from one pass.

    What a train step needs on a diagnostics step: the same single forward pass and
    per-term backward passes that yield the per-term gradients also yield the total gradient
    ``g = Σ_i g_i`` for the update, so no separate ``value_and_grad`` is needed.

    On top of the SPEC §4 figures (SPEC §12), from the same per-term gradients:

    * ``gram``: the term Gram matrix of the *unweighted* gradients ``ĝ_i = g_i / w_i``,
      ``G_ij = ⟨ĝ_i, ĝ_j⟩``, as keys ``grad_gram[a,b]`` (``a`` before ``b`` in term
      order, diagonal included). A term of weight 0 has no measured direction: its
      row and column are 0. Unweighting needs the weights inside ``terms_fn``'s terms:
      by default (``gram=None``) the matrix is emitted when ``weights`` is given (``{}``
      when every such term has weight 1) or ``terms_fn`` has no term but the base;
    * ``groups``: ``‖g_i‖`` restricted to each top-level parameter group
      (``<t>_param_grad_norm[<group>]``; the top level below a lone wrapper key such as
      Flax's ``"params"``);
    * ``preconditioner``: a diagonal ``P`` (a pytree shaped like ``params``, or a
      function of the total gradient returning one, e.g. from
      :func:`diagonal_preconditioner`) gives the update-space shares
      ``<t>_update_share = ⟨P g_i, P g⟩ / ‖P g‖²``.

    Args:
      terms_fn: as in :func:`gradient_diagnostics`; with ``has_aux=True`` it returns
        ``((base_loss, {name: term}), aux)``.
      params: the parameter pytree.
      param_terms: parameter-only terms with closed-form gradients.
      pairwise: also compute the pairwise cosine matrix.
      has_aux: whether ``terms_fn`` returns an auxiliary output.
      weights: ``{name: w}``, the weights inside ``terms_fn``'s (weighted) terms, used
        to unweight the Gram matrix; unlisted terms have weight 1 (``base`` always;
        ``param_terms`` carry their own).
      gram: emit the Gram matrix entries (None: when the weights are known, see above).
      groups: emit the per-group gradient norms.
      preconditioner: a diagonal preconditioner for update-space shares, or None.

    Returns:
      A :class:`DiagnosticsResult` ``(loss, values, grads, metrics, aux)``.
    """
    param_terms = _check_param_terms("value_and_grad_with_diagnostics", param_terms)
    names: list[str] = []

    def stacked(p: PyTree) -> Any:
        out = terms_fn(p)
        (base, terms), aux = out if has_aux else (out, None)
        names[:] = _check_terms("gradient_diagnostics", base, terms, param_terms)
        vec = jnp.stack([jnp.asarray(base), *(jnp.asarray(terms[n]) for n in names[1:])])
        return (vec, aux) if has_aux else vec

    if has_aux:
        values, vjp_fn, aux = jax.vjp(stacked, params, has_aux=True)
    else:
        (values, vjp_fn), aux = jax.vjp(stacked, params), None
    k = values.shape[0]
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in path_leaves]
    leaf_groups = _leaf_groups([path for path, _ in path_leaves])
    group_names = list(dict.fromkeys(leaf_groups)) if groups else []
    # per term, its gradient's leaves (model terms first, then the closed-form ones)
    if _backward() == "vmap":
        (batched,) = jax.vmap(vjp_fn)(jnp.eye(k, dtype=values.dtype))
        batched_leaves = treedef.flatten_up_to(batched)
        term_leaves = [[b[j] for b in batched_leaves] for j in range(k)]
    else:
        term_leaves = [treedef.flatten_up_to(vjp_fn(e)[0]) for e in jnp.eye(k, dtype=values.dtype)]
    closed = [term.value_and_grad(params) for term in param_terms.values()]
    term_leaves += [treedef.flatten_up_to(grad) for _, grad in closed]

    acc = jnp.result_type(
        jnp.float32, values.dtype, *(leaf.dtype for leaf in leaves if _is_float(leaf))
    )
    t = len(term_leaves)
    gram_w = jnp.zeros((t, t), acc)  # ⟨g_i, g_j⟩
    dots = jnp.zeros((t,), acc)  # ⟨g_i, g⟩
    gg = jnp.zeros((), acc)  # ‖g‖²
    group_sq = {group: jnp.zeros((t,), acc) for group in group_names}
    total_leaves = []
    stacks: list[tuple[jax.Array, jax.Array] | None] = []
    for i, leaf in enumerate(leaves):
        if not _is_float(leaf):
            total_leaves.append(_zero_grad(jnp.asarray(leaf)))
            stacks.append(None)
            continue
        # one [T, n] operand per leaf: no raveled copy of the whole parameter vector
        r = jnp.stack([term[i].reshape(leaf.size).astype(acc) for term in term_leaves])
        g = jnp.sum(r, axis=0)
        rr = jnp.matmul(r, r.T, precision=_HIGHEST)
        gram_w = gram_w + rr
        if groups:
            group_sq[leaf_groups[i]] = group_sq[leaf_groups[i]] + jnp.diagonal(rr)
        dots = dots + jnp.matmul(r, g, precision=_HIGHEST)
        gg = gg + jnp.dot(g, g, precision=_HIGHEST)
        total_leaves.append(g.reshape(leaf.shape).astype(leaf.dtype))
        stacks.append((r, g))
    grads = jax.tree.unflatten(treedef, total_leaves)

    update_dots = None
    if preconditioner is not None:
        precond = preconditioner(grads) if callable(preconditioner) else preconditioner
        p_leaves = treedef.flatten_up_to(precond)
        update_dots = jnp.zeros((t,), acc)  # ⟨P g_i, P g⟩
        update_gg = jnp.zeros((), acc)  # ‖P g‖²
        for leaf, stack, p_leaf in zip(leaves, stacks, p_leaves, strict=True):
            if stack is None:
                continue
            r, g = stack
            p = jnp.broadcast_to(jnp.asarray(p_leaf, acc), jnp.shape(leaf)).reshape(-1)
            pg = p * g
            update_dots = update_dots + jnp.matmul(r, p * pg, precision=_HIGHEST)
            update_gg = update_gg + jnp.dot(pg, pg, precision=_HIGHEST)

    # report in a fixed order — base, then every other term by name — whatever order
    # dicts come in (pytree flattening under jit sorts them)
    all_names = [*names, *param_terms]
    order = [0, *sorted(range(1, t), key=all_names.__getitem__)]
    perm = jnp.asarray(order)
    all_names = [all_names[i] for i in order]
    gram_p = gram_w[perm][:, perm]
    norms, shares, cos = _figures(gram_p, dots[perm], gg)
    per_term = [(q, v) for q, v in (("param_grad_norm", norms), ("grad_share", shares))]
    per_term.append(("grad_cosine", cos[:, 0]))
    if update_dots is not None:
        per_term.append(("update_share", _share_vector(update_dots[perm], update_gg)))
    # one column per figure, packed in one piece (a scalar per key would cost one small
    # kernel each on XLA:CPU); keys per term in turn, then groups, then the Gram matrix
    columns = [([term_key(n, q) for n in all_names], v) for q, v in per_term]
    order = [term_key(n, q) for n in all_names for q, _ in per_term]
    if groups and group_names:
        sq = jnp.stack([group_sq[group][perm] for group in group_names])
        keys = [group_key(n, group) for group in group_names for n in all_names]
        columns.append((keys, jnp.sqrt(jnp.maximum(sq, 0)).reshape(-1)))
        order += keys
    if gram is None:
        gram = weights is not None or k == 1
    if gram:
        weights = dict(weights or {})
        weights.update((name, term.weight) for name, term in param_terms.items())
        w = jnp.stack(
            [jnp.asarray(weights.get(n, 1.0) if n != BASE else 1.0, acc) for n in all_names]
        )
        inv = jnp.where(w != 0, 1 / jnp.where(w != 0, w, 1), 0)
        upper = np.triu_indices(t)
        unweighted = (gram_p * inv[:, None] * inv[None, :])[upper]
        keys = [gram_key(all_names[a], all_names[b]) for a, b in zip(*upper, strict=True)]
        columns.append((keys, unweighted))
        order += keys
    metrics = Metrics.from_columns(columns, order=order)
    if pairwise:
        metrics = metrics.merge({PAIRWISE_KEY: cos})
    unordered = dict(zip(names, values, strict=True))
    unordered.update((name, value) for name, (value, _) in zip(param_terms, closed, strict=True))
    term_values = {name: unordered[name] for name in all_names}
    loss = jnp.sum(values) + sum((v for v, _ in closed), jnp.zeros((), values.dtype))
    return DiagnosticsResult(
        loss=loss,
        values=term_values,
        grads=grads,
        metrics=metrics,
        aux=aux,
    )


def _leaf_groups(paths: list[tuple[Any, ...]]) -> list[str]:
    """Each leaf's top-level parameter group (below a lone wrapper key like ``params``)."""

    def name(entry: Any) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    depth = 0
    while (
        paths
        and all(len(p) > depth + 1 for p in paths)
        and len({name(p[depth]) for p in paths}) == 1
    ):
        depth += 1
    return [name(p[depth]) if len(p) > depth else "params" for p in paths]


def term_names(
    terms_fn: TermsFn,
    params: PyTree,
    *,
    param_terms: Mapping[str, ParamTerm] | None = None,
    has_aux: bool = False,
) -> tuple[str, ...]:
    """The term order of the diagnostics (and of the ``pairwise_cosine`` rows/columns).

    ``"base"``, then every other term (from ``terms_fn`` and ``param_terms``) sorted by
    name — a fixed order, whatever order the dicts come in (pytree flattening under
    ``jit`` sorts dict keys). Found by abstract evaluation (``jax.eval_shape``).
    """
    param_terms = _check_param_terms("term_names", param_terms)
    names: list[str] = []

    def record(p: PyTree) -> None:
        out = terms_fn(p)
        base, terms = out[0] if has_aux else out
        names[:] = _check_terms("term_names", base, terms, param_terms)

    jax.eval_shape(record, params)
    return (BASE, *sorted([*names[1:], *param_terms]))


def _share_vector(dots: jax.Array, gg: jax.Array) -> jax.Array:
    """``⟨x_i, x⟩ / ‖x‖²`` per term (0 when ``x = 0``)."""
    nonzero = gg > 0
    return jnp.where(nonzero, dots / jnp.where(nonzero, gg, 1), 0)


def _figures(gram: jax.Array, dots: jax.Array, gg: jax.Array) -> tuple[jax.Array, ...]:
    """Norms, shares and the cosine matrix from the Gram matrix, with zero-norm guards."""
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))
    denom = norms[:, None] * norms[None, :]
    ok = denom > 0
    cos = jnp.clip(jnp.where(ok, gram / jnp.where(ok, denom, 1), 0), -1, 1)
    cos = jnp.where(jnp.eye(gram.shape[0], dtype=bool), (norms > 0).astype(cos.dtype), cos)
    return norms, _share_vector(dots, gg), cos


def _is_float(leaf: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _check_param_terms(fn: str, param_terms: Any) -> dict[str, ParamTerm]:
    if param_terms is None:
        return {}
    if not isinstance(param_terms, Mapping):
        raise ValueError(
            f"{fn}: param_terms must be a mapping name -> ParamTerm (from l1_term, l2_term "
            f"or elastic_net_term) or None; got {type(param_terms).__name__}"
        )
    for name, term in param_terms.items():
        if not isinstance(name, str) or not isinstance(term, ParamTerm):
            raise ValueError(
                f"{fn}: param_terms[{name!r}] must be a ParamTerm (from l1_term, l2_term or "
                f"elastic_net_term) keyed by a str; got {type(term).__name__}"
            )
        if name in (BASE, "pairwise"):
            raise ValueError(f"{fn}: param_terms name {name!r} is reserved; use another name")
    return dict(param_terms)


def _check_terms(fn: str, base: Any, terms: Any, param_terms: Mapping[str, ParamTerm]) -> list[str]:
    """Validate ``terms_fn``'s output (shapes only: works on tracers); return the names."""
    if not isinstance(terms, Mapping):
        raise ValueError(
            f"{fn}: terms_fn must return (base_loss, {{name: weighted_term}}); the second "
            f"element is a {type(terms).__name__}, not a mapping"
        )
    if jnp.shape(base) != ():
        raise ValueError(
            f"{fn}: terms_fn's base loss must be a scalar; got shape {jnp.shape(base)}"
        )
    for name, value in terms.items():
        if not isinstance(name, str) or name in (BASE, "pairwise"):
            raise ValueError(
                f"{fn}: term names must be strings other than 'base' and 'pairwise'; got {name!r}"
            )
        if name in param_terms:
            raise ValueError(
                f"{fn}: term {name!r} is both in terms_fn's output and in param_terms; "
                "names must be unique"
            )
        if jnp.shape(value) != ():
            raise ValueError(f"{fn}: term {name!r} must be a scalar; got shape {jnp.shape(value)}")
    return [BASE, *terms]
