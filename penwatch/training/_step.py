"""Jitted train steps with penalty metrics, periodic gradient diagnostics and leaf reports.

``build_train_step(apply_fn, loss_fn, pipeline, optimizer) -> (init_fn, step_fn)`` over a
plain ``apply_fn(params, x)`` (a function, Flax Linen's ``model.apply``, …):

* ``init_fn(params) -> TrainState`` (params, optimizer state, step, pipeline, parameter
  terms); the pipeline and the parameter terms' weights live in the state as pytree
  leaves, so changing them (schedules) never recompiles the step;
* ``step_fn(state, batch) -> (state, metrics)``, compiled once, metrics a
  :class:`penwatch.Metrics` left on the device (see :data:`METRIC_KEYS_DOC`).

Gradient diagnostics (SPEC §4) run every ``diagnostics_every`` steps through a second
compiled function picked on the host, so ordinary steps pay nothing for them; on a
diagnostics step the per-term gradients (one vmapped backward pass) also give the total
gradient used for the update.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from penwatch import _checks
from penwatch.diagnostics import (
    ParamTerm,
    diagonal_preconditioner,
    value_and_grad_with_diagnostics,
)
from penwatch.diagnostics import elastic_net_term as _elastic_net_term
from penwatch.diagnostics import l1_term as _l1_term
from penwatch.diagnostics import l2_term as _l2_term
from penwatch.forensics import CapsuleWriter
from penwatch.penalties import leaf_finite_counts
from penwatch.schema import LEAF_COUNTS, Metrics, TreeLeafCounts, penalty_key
from penwatch.training._loss import flatten_params
from penwatch.training._order import nearest_loss_order
from penwatch.training._state import (
    StepFunction,
    TrainState,
    _check_names,
    _HostStep,
    _normalize_terms,
    _split_batch,
    _strong_types,
    _tree_add,
)

__all__ = [
    "METRIC_KEYS_DOC",
    "build_train_step",
    "build_train_step_with_weight_decay",
]

METRIC_KEYS_DOC = """\
Metrics of a penwatch train step: a ``pw.Metrics`` (flat keys, values packed on the
device into one buffer per dtype group, ``metrics.penalties`` the pipeline's penalties
in pipeline order, then the parameter terms):

* ``loss`` — the total objective ``base_loss + total``;
* ``base_loss`` — the task loss (``loss_fn`` averaged);
* per penalty ``P`` of the pipeline and per parameter term: ``P``, ``P_weighted``,
  ``P_weight``, ``P_finite`` (and ``P_grad_norm`` with ``track_grad_norms=True``);
* ``total`` — the sum of all weighted penalties and parameter terms
  (``total_grad_norm`` with ``track_grad_norms=True``: the pipeline's input gradient);
* ``loss_finite``, ``grads_finite`` (bool) and ``grad_norm`` (global ℓ2 norm of the
  gradient); ``update_skipped`` (bool) with ``skip_nonfinite=True``;
* every ``diagnostics_every`` steps: ``<term>_param_grad_norm``, ``<term>_grad_share``,
  ``<term>_grad_cosine`` for ``base`` and every penalty / parameter term (and
  ``pairwise_cosine`` with ``pairwise=True``); the term Gram matrix ``grad_gram[a,b]``
  of the unweighted gradients, ``<term>_param_grad_norm[<group>]`` per top-level
  parameter group and, under a diagonally preconditioned optimizer,
  ``<term>_update_share`` (SPEC §12);
* activity steps (``build_activity_train_step``): ``<capture>_dead_fraction``, the
  fraction of a captured activation's units that are zero for the whole batch;
* ``_leaf_nonfinite`` (not a metric): a ``TreeLeafCounts`` reading as
  ``{"params": LeafCounts, "grads": LeafCounts}``, each ``{path: (nan_count,
  inf_count)}`` (paths from ``jax.tree_util.keystr``, rows nearest the loss first: the
  reverse of the order in which the forward pass first reads each parameter leaf;
  params are the updated ones), over one ``int32[n, 2]`` array for both trees, from
  which the monitor names the offending leaves.
"""

PenaltyOn = Literal["outputs", "params"] | Callable[[Any, Any], Any]
_INT32_MAX = int(np.iinfo(np.int32).max)


def _make_step(
    fn_name: str,
    apply_fn: Callable,
    loss_fn: Callable,
    pipeline: Any,
    optimizer: optax.GradientTransformation,
    *,
    forward: Callable[[Any, Any], tuple[Any, Any]],
    diagnostics_every: int,
    param_terms: Any,
    pairwise: bool,
    track_grad_norms: bool,
    skip_nonfinite: bool,
    max_nonfinite_skips: int | None,
    leaf_report: bool,
    nan_capsule: Any = None,
    preconditioner: Any = "auto",
    extra_metrics: Callable[[Any], Mapping[str, Any]] | None = None,
) -> tuple[Callable[[Any], TrainState], StepFunction]:
    _checks.check_callable(fn_name, "apply_fn", apply_fn)
    if not (preconditioner is None or preconditioner == "auto" or callable(preconditioner)):
        raise _checks.option_error(
            fn_name,
            "preconditioner",
            preconditioner,
            '"auto", None or a function opt_state -> diagonal pytree',
        )
    _checks.check_callable(fn_name, "loss_fn", loss_fn)
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise _checks.option_error(
            fn_name, "optimizer", optimizer, "an optax GradientTransformation", label="argument"
        )
    if pipeline is not None and not hasattr(pipeline, "compute"):
        raise _checks.option_error(
            fn_name,
            "pipeline",
            pipeline,
            "a penwatch Pipeline, MultiPipeline or None",
            label="argument",
        )
    every = _checks.check_int(fn_name, "diagnostics_every", diagnostics_every, min=0)
    pairwise = _checks.check_bool(fn_name, "pairwise", pairwise)
    track = _checks.check_bool(fn_name, "track_grad_norms", track_grad_norms)
    skip = _checks.check_bool(fn_name, "skip_nonfinite", skip_nonfinite)
    leaf_report = _checks.check_bool(fn_name, "leaf_report", leaf_report)
    capsules = _capsule_writer(fn_name, nan_capsule)
    terms0 = _normalize_terms(fn_name, param_terms)
    _check_names(fn_name, pipeline, terms0)
    if skip:
        limit = (
            _INT32_MAX
            if max_nonfinite_skips is None
            else _checks.check_int(fn_name, "max_nonfinite_skips", max_nonfinite_skips, min=0)
        )
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=limit)

    def objective(params: Any, pipe: Any, x: Any, y: Any) -> tuple[jax.Array, Any]:
        preds, penalty_input = forward(params, x)
        base = jnp.mean(loss_fn(preds, y))
        extra = {} if extra_metrics is None else dict(extra_metrics(penalty_input))
        if pipe is None:
            return base, (base, Metrics.pack({}), extra)
        total, pm = pipe.compute(penalty_input, track_grad_norms=track)
        return base + total, (base, pm, extra)

    def precondition(
        opt_state: Any, params: Any, done: dict[str, Any]
    ) -> Callable[[Any], Any] | None:
        """``grads -> P`` from the optimizer state after this step's update, or None.

        The update it runs is kept in ``done["update"]`` for the step to apply: the
        optimizer runs once per step.
        """
        if preconditioner is None:
            return None
        read = (
            functools.partial(diagonal_preconditioner, params=params)
            if preconditioner == "auto"
            else preconditioner
        )
        if preconditioner == "auto" and read(opt_state) is None:
            return None  # not a diagonally preconditioned optimizer (decided at trace time)

        def precond(grads: Any) -> Any:
            done["update"] = optimizer.update(grads, opt_state, params)
            return read(done["update"][1])

        return precond

    orders: dict[Any, tuple[str, ...]] = {}

    def step(state: TrainState, batch: Any, with_diag: bool) -> tuple[TrainState, Metrics]:
        x, y = _split_batch(batch)
        params, pipe, terms = state.params, state.pipeline, dict(state.param_terms or {})
        diag: Mapping[str, Any] = Metrics.pack({})
        done: dict[str, Any] = {}  # the optimizer update, when the diagnostics ran it
        if with_diag:
            names = tuple(getattr(pipe, "enabled_names", ())) if pipe is not None else ()

            def terms_fn(p: Any) -> Any:
                _, aux = objective(p, pipe, x, y)
                pm = aux[1]
                return (aux[0], {n: pm[penalty_key(n, "weighted")] for n in names}), aux

            weights = pipe.weights if pipe is not None else {}
            res = value_and_grad_with_diagnostics(
                terms_fn,
                params,
                param_terms=terms,
                pairwise=pairwise,
                has_aux=True,
                weights={n: weights[n] for n in names},
                preconditioner=precondition(state.opt_state, params, done),
            )
            base, pm, extra = res.aux
            grads, loss = res.grads, res.loss
            diag = res.metrics
        else:
            (loss, (base, pm, extra)), grads = jax.value_and_grad(objective, has_aux=True)(
                params, pipe, x, y
            )
            for term in terms.values():
                value, grad = term.value_and_grad(params)
                loss = loss + value
                grads = _tree_add(grads, grad)
        total = pm["total"] if "total" in pm else jnp.zeros((), jnp.result_type(base))
        term_metrics: dict[str, Any] = {}
        for name, term in terms.items():
            raw = dataclasses.replace(term, weight=jnp.ones((), jnp.float32)).value(params)
            term_metrics[penalty_key(name)] = raw
            term_metrics[penalty_key(name, "weighted")] = term.weight * raw
            term_metrics[penalty_key(name, "weight")] = term.weight
            term_metrics[penalty_key(name, "finite")] = jnp.isfinite(raw)
            total = total + term.weight * raw
        if "update" in done:
            updates, opt_state = done["update"]
        else:
            updates, opt_state = optimizer.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        grad_counts = leaf_finite_counts(grads)
        bad = sum((n + i for n, i in grad_counts.values()), jnp.zeros((), jnp.int32))
        tail: dict[str, Any] = {
            "total": total,  # replaces the pipeline's total in place
            "loss_finite": jnp.isfinite(loss),
            "grads_finite": bad == 0,
            "grad_norm": optax.tree.norm(grads),
        }
        late: dict[str, Any] = {}
        if skip:
            late["update_skipped"] = jnp.logical_not(opt_state.last_finite)
        if leaf_report:
            # Rows nearest the loss first (the output layer): where a non-finite value
            # enters the backward pass. Read from the traced forward pass (trace time).
            shapes = jax.tree.map(lambda a: (a.shape, a.dtype), params)
            key = (jax.tree.structure(params), tuple(jax.tree.leaves(shapes)))
            order = orders.get(key)
            if order is None:  # one extra trace of the forward pass, shared by variants
                order = orders[key] = nearest_loss_order(
                    lambda p: objective(p, pipe, x, y)[0], params
                )
            param_counts = _ordered(leaf_finite_counts(new_params), order)
            grad_counts = _ordered(grad_counts, order)
            # one [n, 2] array for both trees, not two scalar buffers per leaf
            late[LEAF_COUNTS] = TreeLeafCounts.pack({"params": param_counts, "grads": grad_counts})
        # The pipeline's buffers are reused whole; penalty order travels as data.
        penalties = (*pm.penalties, *terms)
        head = Metrics.pack({"loss": loss, "base_loss": base})
        # the diagnostics come packed (one column per figure) and are reused whole
        metrics = head.merge(pm, term_metrics, extra, tail, diag, late, penalties=penalties)
        new_state = TrainState(new_params, opt_state, state.step + 1, pipe, terms)
        return new_state, metrics

    host = _HostStep()

    default_pipeline = pipeline

    def init_fn(params: Any, *, pipeline: Any = None) -> TrainState:
        """``TrainState`` for ``params`` (``pipeline`` replaces the builder's pipeline)."""
        pipe = default_pipeline if pipeline is None else pipeline
        params = _strong_types(params)
        state = TrainState(
            params=params,
            opt_state=optimizer.init(params),
            step=jnp.zeros((), jnp.int32),
            pipeline=pipe,
            param_terms=dict(terms0),
        )
        host.remember(state, 0)
        return state

    plain = jax.jit(functools.partial(step, with_diag=False))
    diag = jax.jit(functools.partial(step, with_diag=True))
    return init_fn, StepFunction(plain, diag, every, host, capsules)


def _capsule_writer(fn_name: str, nan_capsule: Any) -> CapsuleWriter | None:
    if nan_capsule is None or isinstance(nan_capsule, CapsuleWriter):
        return nan_capsule
    if isinstance(nan_capsule, str | os.PathLike) and str(nan_capsule):
        return CapsuleWriter(nan_capsule)
    raise _checks.option_error(
        fn_name, "nan_capsule", nan_capsule, "None, a directory path or a CapsuleWriter"
    )


def _ordered(counts: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    rank = {path: i for i, path in enumerate(order)}
    return dict(sorted(counts.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _forward_for(fn_name: str, apply_fn: Callable, penalty_on: Any) -> Callable:
    if callable(penalty_on):

        def forward(params: Any, x: Any) -> tuple[Any, Any]:
            preds = apply_fn(params, x)
            return preds, penalty_on(params, preds)

        return forward
    penalty_on = _checks.check_choice(fn_name, "penalty_on", penalty_on, ("outputs", "params"))
    if penalty_on == "outputs":

        def forward(params: Any, x: Any) -> tuple[Any, Any]:
            preds = apply_fn(params, x)
            return preds, preds

    else:

        def forward(params: Any, x: Any) -> tuple[Any, Any]:
            return apply_fn(params, x), flatten_params(params)

    return forward


def build_train_step(
    apply_fn: Callable[[Any, Any], Any],
    loss_fn: Callable[[Any, Any], jax.Array],
    pipeline: Any,
    optimizer: optax.GradientTransformation,
    *,
    penalty_on: PenaltyOn = "outputs",
    diagnostics_every: int = 0,
    param_terms: Mapping[str, ParamTerm] | None = None,
    pairwise: bool = False,
    track_grad_norms: bool = False,
    skip_nonfinite: bool = False,
    max_nonfinite_skips: int | None = None,
    leaf_report: bool = True,
    nan_capsule: str | os.PathLike[str] | CapsuleWriter | None = None,
    preconditioner: Literal["auto"] | Callable[[Any], Any] | None = "auto",
) -> tuple[Callable[..., TrainState], StepFunction]:
    """Build ``(init_fn, step_fn)``: a jitted train step with penalty metrics.

    .. math:: L(\\theta) = \\operatorname{mean}\\,\\ell(f_\\theta(x), y)
       + \\sum_i w_i P_i(z) + \\sum_k T_k(\\theta)

    with ``z`` the predictions (``penalty_on="outputs"``), all parameters flattened
    (``"params"``) or ``penalty_on(params, predictions)`` (a callable), and ``T_k`` the
    closed-form ``param_terms``.

    Args:
      apply_fn: ``apply_fn(params, x) -> predictions`` (e.g. Flax Linen ``model.apply``).
      loss_fn: ``loss_fn(predictions, targets)``, optax order; averaged to a scalar.
      pipeline: a ``penwatch.Pipeline`` (or ``MultiPipeline`` with a callable
        ``penalty_on`` returning its inputs dict), or None.
      optimizer: an optax transformation (e.g. wrapped by ``penwatch.optim`` helpers).
      penalty_on: ``"outputs"``, ``"params"`` or ``fn(params, predictions) -> input``.
      diagnostics_every: 0: never; N: gradient diagnostics (SPEC §4) at steps 0, N, 2N…
      param_terms: ``{name: ParamTerm}`` (``penwatch.diagnostics.l1_term`` …): parameter
        penalties added to the loss, with closed-form gradients (no backward pass) and
        weights in the state (schedulable).
      pairwise: add the ``pairwise_cosine`` matrix on diagnostics steps.
      track_grad_norms: the pipeline's input-gradient norms (``P_grad_norm``).
      skip_nonfinite: wrap the optimizer in ``optax.apply_if_finite``: a step whose
        gradient is non-finite leaves params and optimizer state unchanged.
      max_nonfinite_skips: give up skipping after this many consecutive non-finite steps
        (None: never).
      leaf_report: return ``_leaf_nonfinite`` per-leaf NaN/Inf counts.
      nan_capsule: a directory (or a :class:`penwatch.forensics.CapsuleWriter`): save
        the inputs of the first non-finite step of each episode there, for
        :func:`penwatch.forensics.replay` (SPEC section 13). Host-side only: the
        compiled step is the same with or without it (``step_fn.capsules.flush()``
        waits for pending writes).
      preconditioner: update-space shares (``<term>_update_share``) on diagnostics
        steps: ``"auto"`` reads a diagonal preconditioner from the optax state (Adam,
        AdamW, RMSProp, Adagrad: :func:`penwatch.diagnostics.diagonal_preconditioner`;
        nothing for other optimizers), a function ``opt_state -> P`` (a pytree shaped
        like the parameters) for any other, None for none. ``P`` is read from the
        state after the step's update.

    Returns:
      ``(init_fn, step_fn)``: ``init_fn(params) -> TrainState``;
      ``step_fn(state, batch) -> (state, metrics)`` with ``batch = (x, y)`` (or a dict
      with ``x``/``y``). Metric keys: see :data:`METRIC_KEYS_DOC`.
    """
    fn = "penwatch.training.build_train_step"
    return _make_step(
        fn,
        apply_fn,
        loss_fn,
        pipeline,
        optimizer,
        forward=_forward_for(fn, apply_fn, penalty_on),
        diagnostics_every=diagnostics_every,
        param_terms=param_terms,
        pairwise=pairwise,
        track_grad_norms=track_grad_norms,
        skip_nonfinite=skip_nonfinite,
        max_nonfinite_skips=max_nonfinite_skips,
        leaf_report=leaf_report,
        nan_capsule=nan_capsule,
        preconditioner=preconditioner,
    )


_DECAY_TERMS = {"l2": _l2_term, "l1": _l1_term}


def build_train_step_with_weight_decay(
    apply_fn: Callable[[Any, Any], Any],
    loss_fn: Callable[[Any, Any], jax.Array],
    pipeline: Any,
    optimizer: optax.GradientTransformation,
    *,
    decay: float = 0.01,
    kind: Literal["l2", "l1", "elastic_net"] = "l2",
    l1_ratio: float = 0.5,
    mask: Any = None,
    name: str = "weight_decay",
    **kwargs: Any,
) -> tuple[Callable[..., TrainState], StepFunction]:
    """A train step whose loss also penalizes the parameters (the seed's weight decay).

    Adds the parameter term ``name`` to the loss, with a closed-form gradient:

    * ``"l2"``: ``decay·Σθ²`` (gradient ``2·decay·θ``, like ``pw.l2(θ, strength=decay)``;
      equal to ``penwatch.optim.add_l2_decay(opt, 2·decay)`` for plain SGD);
    * ``"l1"``: ``decay·Σ|θ|`` (gradient ``decay·sign(θ)``);
    * ``"elastic_net"``: ``decay·(r·Σ|θ| + (1 - r)·Σθ²)``.

    The term is visible like any penalty (``weight_decay``, ``weight_decay_weighted``…,
    and in the gradient diagnostics) and its weight is schedulable. For decay that goes
    around the optimizer's rescaling (AdamW), use ``penwatch.optim.add_l2_decay(...,
    decoupled=True)`` with :func:`build_train_step` instead.

    Args:
      apply_fn, loss_fn, pipeline, optimizer: as in :func:`build_train_step`.
      decay: the term's weight (finite real).
      kind: ``"l2"``, ``"l1"`` or ``"elastic_net"``.
      l1_ratio: elastic-net mixing ``r`` in ``[0, 1]``.
      mask: leaves to decay (pytree of bools or ``params -> mask``); None: all.
      name: the term's name in the metrics.
      **kwargs: any :func:`build_train_step` option (``param_terms`` are merged).

    Returns:
      ``(init_fn, step_fn)`` as :func:`build_train_step`.
    """
    fn = "penwatch.training.build_train_step_with_weight_decay"
    kind = _checks.check_choice(fn, "kind", kind, ("l2", "l1", "elastic_net"))
    decay = _checks.check_finite_real(fn, "decay", decay)
    if kind == "elastic_net":
        l1_ratio = _checks.check_in_range(fn, "l1_ratio", l1_ratio, 0.0, 1.0)
        term = _elastic_net_term(decay, l1_ratio, mask=mask)
    else:
        term = _DECAY_TERMS[kind](decay, mask=mask)
    terms = dict(kwargs.pop("param_terms", None) or {})
    if name in terms:
        raise ValueError(f"{fn}: param_terms already has a term named {name!r}")
    terms[name] = term
    return build_train_step(apply_fn, loss_fn, pipeline, optimizer, param_terms=terms, **kwargs)
