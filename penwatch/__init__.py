"""penwatch: telemetry-first regularization penalties for JAX.

Every penalty you add to a loss should be visible while you train: its value, its share
of the loss, its share of the gradient, how long it took, and whether it went NaN.
"""

from penwatch._version import __version__ as __version__

# --- math layer: penalties, divergences, constraints, gradient penalties, validation ---
from penwatch import penalties as penalties
from penwatch.penalties._constraints import consistency as consistency
from penwatch.penalties._constraints import orthogonality as orthogonality
from penwatch.penalties._divergences import entropy as entropy
from penwatch.penalties._divergences import js_divergence as js_divergence
from penwatch.penalties._divergences import kl_divergence as kl_divergence
from penwatch.penalties._gradient import gradient_penalty as gradient_penalty
from penwatch.penalties._gradient import (
    interpolated_gradient_penalty as interpolated_gradient_penalty,
)
from penwatch.penalties._gradient import output_magnitude_penalty as output_magnitude_penalty
from penwatch.penalties._norms import elastic_net as elastic_net
from penwatch.penalties._norms import l1 as l1
from penwatch.penalties._norms import l2 as l2
from penwatch.penalties._validation import NonFiniteError as NonFiniteError
from penwatch.penalties._validation import Validation as Validation
from penwatch.penalties._validation import finite_report as finite_report
from penwatch.penalties._validation import leaf_finite_counts as leaf_finite_counts
from penwatch.penalties._validation import validate as validate

# --- composition: pipelines, events, gradient diagnostics ---
from penwatch import events as events
from penwatch.pipelines import MultiPipeline as MultiPipeline
from penwatch.pipelines import Pipeline as Pipeline
from penwatch.pipelines import multi_pipeline as multi_pipeline
from penwatch.pipelines import pipeline as pipeline
from penwatch.schema import Metrics as Metrics
from penwatch import diagnostics as diagnostics
from penwatch.diagnostics import gradient_diagnostics as gradient_diagnostics

# --- training integration: optax transforms, train steps, schedules, trainer ---
from penwatch import forensics as forensics
from penwatch import optim as optim
from penwatch import training as training
from penwatch.training import apply_scheduled_weights as apply_scheduled_weights
from penwatch.training import build_train_step as build_train_step
from penwatch.training import capture as capture
from penwatch.training import trainer as trainer
from penwatch.training import weight_schedule as weight_schedule

# --- telemetry: monitor, sinks, alerts ---
from penwatch import alerts as alerts
from penwatch import sinks as sinks
from penwatch import telemetry as telemetry
from penwatch.telemetry import Monitor as Monitor
from penwatch.telemetry import instrument as instrument
