"""A small training loop with penalties, a monitor, schedules and a progress bar.

:func:`trainer` loops epochs over an iterable of batches with a jitted penwatch train
step. The training thread never reads a metric back from the device: metrics go to the
monitor (``monitor.record``, which materializes them on its worker) and to callbacks
such as :func:`log_penalties`; the progress bar only shows values that are already
computed (``jax.Array.is_ready``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from penwatch import _checks, _extras
from penwatch.schema import Metrics, layout_of, penalty_key
from penwatch.training._schedule import apply_scheduled_weights
from penwatch.training._state import StepFunction
from penwatch.training._step import TrainState, build_train_step

__all__ = ["PenaltyLogger", "TrainResult", "log_penalties", "trainer"]

logger = logging.getLogger(__name__)

Callback = Callable[[int, Mapping[str, Any]], None]


class TrainResult(NamedTuple):
    """What :func:`trainer` returns.

    Attributes:
      params: the final parameters.
      state: the final :class:`TrainState` (optimizer state, step, pipeline…).
      history: one dict per epoch: ``epoch``, ``steps``, ``loss`` and ``base_loss``
        (epoch means, device scalars: ``float()`` them when you need numbers), and
        ``weights`` (the scheduled weights of that epoch, or None).
    """

    params: Any
    state: TrainState
    history: list[dict[str, Any]]


def _is_ready(x: Any) -> bool:
    ready = getattr(x, "is_ready", None)
    return True if ready is None else bool(ready())


class PenaltyLogger:
    """A callback ``(step, metrics)`` logging penalty metrics every ``every`` steps.

    Never blocks training: a due step's metrics are kept and logged once the device has
    computed them (checked at later calls); :meth:`flush` logs what is left (blocking).
    """

    def __init__(
        self,
        names: Sequence[str] | None,
        every: int,
        logger_: logging.Logger,
        level: int,
    ) -> None:
        self.names = None if names is None else tuple(names)
        self.every = every
        self.logger = logger_
        self.level = level
        self._pending: list[tuple[int, dict[str, Any]]] = []

    def _keys(self, metrics: Mapping[str, Any]) -> list[str]:
        if self.names is None:
            order = metrics.penalties if isinstance(metrics, Metrics) else None
            names = list(layout_of(metrics, order).penalties)
        else:
            names = list(self.names)
        keys = [k for k in ("loss", "base_loss", "total") if k in metrics]
        for n in names:
            keys += [k for k in (penalty_key(n), penalty_key(n, "weighted")) if k in metrics]
        return keys

    def __call__(self, step: int, metrics: Mapping[str, Any]) -> None:
        if step % self.every == 0:
            self._pending.append((step, {k: metrics[k] for k in self._keys(metrics)}))
        while self._pending and all(_is_ready(v) for v in self._pending[0][1].values()):
            self._emit(*self._pending.pop(0))

    def _emit(self, step: int, values: Mapping[str, Any]) -> None:
        text = " ".join(f"{k}={float(v):.6g}" for k, v in values.items())
        self.logger.log(self.level, "step %d: %s", step, text)

    def flush(self) -> None:
        """Log every pending step (waits for the device)."""
        while self._pending:
            self._emit(*self._pending.pop(0))


def log_penalties(
    pipeline: Any = None,
    *,
    every: int = 100,
    logger: logging.Logger | None = None,
    level: int = logging.INFO,
) -> PenaltyLogger:
    """Log penalty metrics every ``every`` steps (the seed's ``log_penalties``).

    Use as a :func:`trainer` callback, or call it yourself after each step:
    ``log = log_penalties(pipe, every=50); ...; log(step, metrics)``. Each log line
    holds ``loss``, ``base_loss``, ``total`` and, per penalty, its raw and weighted values.

    Args:
      pipeline: a pipeline whose enabled penalties to log (None: every penalty found in
        the metrics, and parameter terms).
      every: log steps 0, every, 2·every, … (``>= 1``).
      logger: a :class:`logging.Logger` (default: ``penwatch.training``'s).
      level: the logging level.

    Returns:
      A :class:`PenaltyLogger` callback ``(step, metrics)``; call ``flush()`` at the end.
    """
    fn = "penwatch.training.log_penalties"
    every = _checks.check_int(fn, "every", every, min=1)
    names = None
    if pipeline is not None:
        if not hasattr(pipeline, "enabled_names"):
            raise _checks.option_error(
                fn, "pipeline", pipeline, "a penwatch pipeline or None", label="argument"
            )
        names = pipeline.enabled_names
    return PenaltyLogger(names, every, logger or logging.getLogger("penwatch.training"), level)


def _epoch_batches(fn: str, data: Any, epoch: int, epochs: int) -> Iterable[Any]:
    if callable(data):
        return data(epoch)
    if epochs > 1 and iter(data) is data:
        raise ValueError(
            f"{fn}: 'data' is a one-shot iterator but epochs={epochs}; pass a re-iterable "
            "(a list, a dataset object) or a callable epoch -> iterable of batches"
        )
    return data


def trainer(
    apply_fn: Callable[[Any, Any], Any] | None,
    loss_fn: Callable[[Any, Any], jax.Array] | None,
    pipeline: Any,
    optimizer: Any,
    params: Any,
    data: Iterable[Any] | Callable[[int], Iterable[Any]],
    *,
    epochs: int = 1,
    monitor: Any = None,
    monitor_pipeline: str | None = None,
    diagnostics_every: int = 0,
    param_terms: Mapping[str, Any] | None = None,
    penalty_on: Any = "outputs",
    skip_nonfinite: bool = False,
    schedule: Callable[[int, int], Mapping[str, Any]] | None = None,
    progress: bool | None = None,
    callbacks: Sequence[Callback] = (),
    train_step: tuple[Callable[..., TrainState], Callable[..., Any]] | None = None,
    nan_capsule: Any = None,
) -> TrainResult:
    """Train for ``epochs`` epochs with penalties, telemetry and schedules.

    Each epoch: apply the schedule's weights (``schedule(epoch, epochs)``, no
    recompilation), then for each batch run the jitted step, ``monitor.record(step,
    metrics, pipeline=..., dispatched_at_ns=...)`` (the monitor takes the loss from
    ``metrics["base_loss"]``) and the callbacks. No metric is converted to a Python
    number on the training thread.

    Args:
      apply_fn: ``apply_fn(params, x)``.
      loss_fn: ``loss_fn(predictions, targets)``.
      pipeline: the penalty pipeline (or None).
      optimizer: an optax transformation.
      params: initial parameters.
      data: an iterable of ``(x, y)`` batches, re-iterated every epoch, or a callable
        ``epoch -> iterable``.
      epochs: number of epochs (``>= 1``).
      monitor: a ``penwatch.Monitor`` (or anything with ``record``), or None.
      monitor_pipeline: the ``pipeline`` label of recorded metrics (default: the
        pipeline's name, else ``"default"``).
      diagnostics_every: gradient diagnostics every N steps (0: never).
      param_terms: parameter terms, as in :func:`build_train_step`.
      penalty_on: as in :func:`build_train_step`.
      skip_nonfinite: skip non-finite updates (``optax.apply_if_finite``).
      schedule: ``fn(epoch, total_epochs) -> {name: weight}``, e.g. from
        :func:`weight_schedule`.
      progress: show a tqdm progress bar: ``None`` (default) when tqdm is installed,
        ``True`` always (tqdm comes with the ``progress`` extra; without it an
        ``ImportError`` names the extra), ``False`` never.
      callbacks: callables ``(step, metrics)`` run after each step (e.g.
        :func:`log_penalties`); their ``flush()`` is called at the end when present.
      train_step: a prebuilt ``(init_fn, step_fn)`` (e.g. from
        :func:`build_activity_train_step`, or shared across runs to reuse its
        compilation); ``apply_fn``/``loss_fn``/``optimizer`` are then unused.
      nan_capsule: a directory or a ``penwatch.forensics.CapsuleWriter``: capsules of
        the first non-finite step of each episode (see :func:`build_train_step`);
        pending capsules are written before the trainer returns. With ``train_step``,
        build that step with ``nan_capsule`` instead.

    Returns:
      A :class:`TrainResult` ``(params, state, history)``.
    """
    fn = "penwatch.training.trainer"
    epochs = _checks.check_int(fn, "epochs", epochs, min=1)
    if progress is None:
        progress = _extras.available("tqdm")
    progress = _checks.check_bool(fn, "progress", progress)
    if monitor is not None and not callable(getattr(monitor, "record", None)):
        raise _checks.option_error(fn, "monitor", monitor, "a penwatch.Monitor or None")
    if schedule is not None:
        _checks.check_callable(fn, "schedule", schedule, label="option")
    callbacks = list(callbacks)
    for i, cb in enumerate(callbacks):
        _checks.check_callable(fn, f"callbacks[{i}]", cb, label="option")
    if train_step is None:
        init_fn, step_fn = build_train_step(
            apply_fn,
            loss_fn,
            pipeline,
            optimizer,
            penalty_on=penalty_on,
            diagnostics_every=diagnostics_every,
            param_terms=param_terms,
            skip_nonfinite=skip_nonfinite,
            nan_capsule=nan_capsule,
        )
    elif nan_capsule is not None:
        raise _checks.option_error(
            fn, "nan_capsule", nan_capsule, "None with train_step= (build it with nan_capsule=)"
        )
    else:
        init_fn, step_fn = train_step
    state = init_fn(params)
    label = monitor_pipeline or getattr(state.pipeline, "name", None) or "default"

    bar = None
    if progress:
        tqdm = _extras.require(
            "tqdm.auto", extra="progress", feature="penwatch.trainer(progress=True)"
        ).tqdm

        total = None
        if not callable(data) and hasattr(data, "__len__"):
            total = epochs * len(data)
        bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)

    history: list[dict[str, Any]] = []
    step = 0
    try:
        for epoch in range(epochs):
            weights = None
            if schedule is not None:
                weights = dict(schedule(epoch, epochs))
                state = apply_scheduled_weights(state, weights)
            losses, base_losses = [], []
            for batch in _epoch_batches(fn, data, epoch, epochs):
                dispatched = time.time_ns()
                state, metrics = step_fn(state, batch)
                if monitor is not None:
                    # the monitor reads the loss from the packed metrics (base_loss)
                    monitor.record(step, metrics, pipeline=label, dispatched_at_ns=dispatched)
                for cb in callbacks:
                    cb(step, metrics)
                losses.append(metrics["loss"])
                base_losses.append(metrics["base_loss"])
                if bar is not None:
                    bar.update(1)
                    _show_ready_loss(bar, losses, epoch)
                step += 1
            history.append(
                {
                    "epoch": epoch,
                    "steps": len(losses),
                    "loss": jnp.mean(jnp.stack(losses)) if losses else None,
                    "base_loss": jnp.mean(jnp.stack(base_losses)) if losses else None,
                    "weights": weights,
                }
            )
    finally:
        if isinstance(step_fn, StepFunction) and step_fn.capsules is not None:
            step_fn.capsules.flush()
        if bar is not None:
            bar.close()
        for cb in callbacks:
            flush = getattr(cb, "flush", None)
            if callable(flush):
                flush()
    return TrainResult(params=state.params, state=state, history=history)


def _show_ready_loss(bar: Any, losses: list[Any], epoch: int) -> None:
    """Show the newest loss that is already computed (never waits for the device)."""
    for value in reversed(losses[-4:]):
        if _is_ready(value):
            bar.set_postfix(epoch=epoch, loss=f"{float(value):.4g}", refresh=False)
            return
