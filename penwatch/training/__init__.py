"""Training integration over a plain ``apply_fn(params, x)`` (the seed's Axon patterns).

Loss wrappers, jitted train-step builders with penalty metrics and periodic gradient
diagnostics, activity regularization through ``capture``, curriculum weight schedules
and a small trainer loop with telemetry.
"""

from penwatch.training._capture import build_activity_train_step as build_activity_train_step
from penwatch.training._capture import capture as capture
from penwatch.training._capture import collect as collect
from penwatch.training._capture import collect_activations as collect_activations
from penwatch.training._loss import flatten_params as flatten_params
from penwatch.training._loss import wrap_loss as wrap_loss
from penwatch.training._loss import wrap_loss_with_pipeline as wrap_loss_with_pipeline
from penwatch.training._schedule import WeightSchedule as WeightSchedule
from penwatch.training._schedule import apply_scheduled_weights as apply_scheduled_weights
from penwatch.training._schedule import weight_schedule as weight_schedule
from penwatch.training._state import StepFunction as StepFunction
from penwatch.training._state import TrainState as TrainState
from penwatch.training._step import METRIC_KEYS_DOC as METRIC_KEYS_DOC
from penwatch.training._step import build_train_step as build_train_step
from penwatch.training._step import (
    build_train_step_with_weight_decay as build_train_step_with_weight_decay,
)
from penwatch.training._trainer import PenaltyLogger as PenaltyLogger
from penwatch.training._trainer import TrainResult as TrainResult
from penwatch.training._trainer import log_penalties as log_penalties
from penwatch.training._trainer import trainer as trainer

__all__ = [
    "METRIC_KEYS_DOC",
    "PenaltyLogger",
    "StepFunction",
    "TrainResult",
    "TrainState",
    "WeightSchedule",
    "apply_scheduled_weights",
    "build_activity_train_step",
    "build_train_step",
    "build_train_step_with_weight_decay",
    "capture",
    "collect",
    "collect_activations",
    "flatten_params",
    "log_penalties",
    "trainer",
    "weight_schedule",
    "wrap_loss",
    "wrap_loss_with_pipeline",
]
