"""penwatch: telemetry-first regularization penalties for JAX.

Every penalty you add to a loss should be visible while you train: its value, its share
of the loss, its share of the gradient, how long it took, and whether it went NaN.
"""

from penwatch._version import __version__ as __version__

# --- math layer: penalties, divergences, constraints, gradient penalties, validation ---

# --- composition: pipelines, events, gradient diagnostics ---

# --- training integration: optax transforms, train steps, schedules, trainer ---

# --- telemetry: monitor, sinks, alerts ---
