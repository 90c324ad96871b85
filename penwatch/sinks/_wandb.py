"""``pw.sinks.WandB``: every record as Weights & Biases history, in order.

A bridge for people who keep their runs in W&B (needs the ``wandb`` extra). Works online
and offline (``mode="offline"``: a local run file, uploaded later with ``wandb sync``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from penwatch import _checks, _extras
from penwatch.schema import Event, RunInfo, RunStatus, StepRecord
from penwatch.sinks._base import Sink
from penwatch.sinks._tracker import event_text, hparam_values

__all__ = ["WandB"]

_FN = "penwatch.sinks.WandB"
_MODES = ("online", "offline", "disabled")


class WandB(Sink):
    """Logs every step, event and the run configuration to a W&B run.

    * every metric of a step as ``<pipeline>/<key>`` in the run's history at that step
      (``run.log(..., step=step)``; NaN and Inf kept), the device time as
      ``penwatch/duration_seconds``;
    * every event (non-finite report, alert, dropped records) in the run summary under
      ``penwatch.<kind>.<name>`` (the latest, ``step 10 [warning] NonFinite: ...``), and
      their count as ``penwatch/<kind>_events``;
    * the run configuration and identity as the run's config (flattened, ``.``-joined
      keys); the run ends with ``run.finish(exit_code=0)`` (1 when stopped or failed)
      and the summary ``penwatch.status``.

    W&B buffers and uploads on its own (its own retries); W&B's history steps only grow,
    so a record whose step is below one already logged (another pipeline's late record)
    is logged at the latest step with its own step as ``penwatch/step``.

    Args:
      project: the W&B project.
      run: an existing ``wandb`` run to log into (then it is not finished at close);
        None: ``wandb.init`` at open with the options below.
      mode: ``"online"``, ``"offline"`` (a local run file) or ``"disabled"``; None: W&B's
        default (``WANDB_MODE``).
      name: the W&B run name (default: the monitor's run, ``/p<process>`` for processes
        other than 0).
      dir: where W&B writes its files (default: W&B's, ``./wandb``).
      init_options: more keyword arguments for ``wandb.init`` (``entity``, ``tags``...).
      batch_size, max_delay, max_pending: delivery sizes (see :class:`~penwatch.sinks.Sink`).
    """

    name = "WandB"

    def __init__(
        self,
        *,
        project: str = "penwatch",
        run: Any = None,
        mode: str | None = None,
        name: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        init_options: Mapping[str, Any] | None = None,
        batch_size: int = 256,
        max_delay: float = 1.0,
        max_pending: int = 10_000,
    ) -> None:
        if not isinstance(project, str) or not project:
            raise _checks.option_error(_FN, "project", project, "a non-empty string")
        if mode is not None:
            _checks.check_choice(_FN, "mode", mode, _MODES)
        if name is not None and not isinstance(name, str):
            raise _checks.option_error(_FN, "name", name, "a string or None")
        if init_options is not None and not isinstance(init_options, Mapping):
            raise _checks.option_error(_FN, "init_options", init_options, "a mapping or None")
        self._wandb = _extras.require("wandb", extra="wandb", feature="pw.sinks.WandB")
        self.project, self.mode, self.run_name = project, mode, name
        self.dir = None if dir is None else os.fspath(dir)
        self.init_options = dict(init_options or {})
        self.run = run
        self._owns_run = run is None
        self.batch_size = _checks.check_int(_FN, "batch_size", batch_size, min=1)
        self.max_delay = _checks.check_nonnegative(_FN, "max_delay", max_delay)
        self.max_pending = _checks.check_int(_FN, "max_pending", max_pending, min=1)
        self._last_step = -1
        self._event_counts: dict[str, int] = {}

    def open(self, info: RunInfo) -> None:
        """Start the W&B run (unless one was given) with the configuration."""
        if self.run is not None:
            if not self._owns_run:
                self.run.config.update(hparam_values(info), allow_val_change=True)
            return
        name = self.run_name or (info.run if info.process == 0 else f"{info.run}/p{info.process}")
        options = {"project": self.project, "name": name, "config": hparam_values(info)}
        if self.mode is not None:
            options["mode"] = self.mode
        if self.dir is not None:
            os.makedirs(self.dir, exist_ok=True)
            options["dir"] = self.dir
        self.run = self._wandb.init(**{**options, **self.init_options, "reinit": "create_new"})

    def write_step(self, record: StepRecord) -> None:
        values: dict[str, Any] = {f"{record.pipeline}/{k}": v for k, v in record.values.items()}
        if record.duration_seconds is not None:
            values["penwatch/duration_seconds"] = record.duration_seconds
        step = record.step
        if step < self._last_step:  # W&B's steps only grow
            values["penwatch/step"] = step
            step = self._last_step
        self.run.log(values, step=step)
        self._last_step = step

    def write_event(self, event: Event) -> None:
        count = self._event_counts.get(event.kind, 0) + 1
        self.run.summary[f"penwatch.{event.kind}.{event.name}"] = event_text(event)
        self.run.summary[f"penwatch/{event.kind}_events"] = count
        self._event_counts[event.kind] = count

    def close(self, *, status: RunStatus = "finished") -> None:
        """Finish the run (exit code 0 when finished, 1 when stopped or failed)."""
        if self.run is None:
            return
        self.run.summary["penwatch.status"] = status
        if self._owns_run:
            self.run.finish(exit_code=0 if status == "finished" else 1)
