"""``pw.instrument``: a pipeline whose every ``compute`` is recorded by a monitor.

The seed library's instrumented ``compute``: each call emits the
``("penwatch", "pipeline", "compute", "start"|"stop")`` events (through the pipeline's own
host-side ``compute``) and is recorded into a :class:`~penwatch.Monitor` as a
``penwatch.pipeline.compute`` record: a span from dispatch to results-ready and an
observation of ``penwatch_pipeline_compute_duration_seconds``. Nothing waits for the
device on the calling thread.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import jax

from penwatch import _checks
from penwatch.telemetry._monitor import Monitor

__all__ = ["InstrumentedPipeline", "instrument"]


class InstrumentedPipeline:
    """A pipeline plus a monitor: ``compute`` records every call (see :func:`instrument`).

    Attribute access falls through to the pipeline; mutators (``update_weight``,
    ``set_enabled``, ``add``, ``remove``, ...) return a new instrumented pipeline on the
    same monitor and step counter.
    """

    def __init__(
        self,
        pipeline: Any,
        monitor: Monitor,
        *,
        label: str | None = None,
        _steps: Any = None,
    ) -> None:
        fn = "penwatch.instrument"
        if not callable(getattr(pipeline, "compute", None)):
            raise _checks.option_error(
                fn, "pipeline", pipeline, "a pw.Pipeline or pw.MultiPipeline", label="argument"
            )
        if not isinstance(monitor, Monitor):
            raise _checks.option_error(fn, "monitor", monitor, "a pw.Monitor", label="argument")
        self.pipeline, self.monitor = pipeline, monitor
        self.label = label or getattr(pipeline, "name", None) or "default"
        self._steps = itertools.count() if _steps is None else _steps

    def compute(self, inputs: Any, *, step: int | None = None, **kwargs: Any) -> tuple[Any, Any]:
        """``pipeline.compute(inputs, **kwargs)``, recorded into the monitor.

        Args:
          inputs: the pipeline input (a dict of named inputs for a MultiPipeline).
          step: the step to record under; default: a counter of this object's calls.
          **kwargs: passed to ``compute`` (e.g. ``track_grad_norms=True``).

        Returns:
          ``(total, metrics)`` exactly as the pipeline returns them (a device array and
          a :class:`penwatch.Metrics`).
        """
        dispatched_at = time.time_ns()
        total, metrics = self.pipeline.compute(inputs, **kwargs)
        self.monitor.record(
            next(self._steps) if step is None else step,
            metrics,
            pipeline=self.label,
            dispatched_at_ns=dispatched_at,
            kind="pipeline_compute",
        )
        return total, metrics

    def compute_total(self, inputs: Any) -> jax.Array:
        """The weighted total only (differentiable; not recorded)."""
        return self.pipeline.compute_total(inputs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.pipeline, name)
        if not callable(attr):
            return attr
        kind = type(self.pipeline)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            if isinstance(out, kind):
                return InstrumentedPipeline(out, self.monitor, label=self.label, _steps=self._steps)
            return out

        return wrapped

    def __repr__(self) -> str:
        return f"instrument({self.pipeline!r}, monitor={self.monitor!r})"


def instrument(
    pipeline: Any, monitor: Monitor, *, label: str | None = None
) -> InstrumentedPipeline:
    """Wrap a pipeline so that every ``compute`` is traced, timed and recorded.

    Example::

        monitor = pw.Monitor("exp", sinks=[pw.sinks.Prometheus()])
        pipe = pw.instrument(pw.pipeline([("l1", 1e-3), ("l2", 1e-2)]), monitor)
        total, metrics = pipe.compute(activations)   # span + histogram + events

    Args:
      pipeline: a ``pw.Pipeline`` or ``pw.MultiPipeline``.
      monitor: where the records go.
      label: the ``pipeline`` label of the records (default: the pipeline's name).

    Returns:
      An :class:`InstrumentedPipeline`.
    """
    return InstrumentedPipeline(pipeline, monitor, label=label)
