"""``pw.sinks.MLflow``: every record as MLflow metrics of a tracking run, in batches.

A bridge for people who keep their runs in MLflow (needs the ``mlflow`` extra:
``mlflow-skinny``, the client without the server).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from penwatch import _checks, _extras
from penwatch.schema import Event, RunInfo, RunStatus, StepRecord
from penwatch.sinks._base import Sink, SinkUnavailable
from penwatch.sinks._tracker import event_text, hparam_values

__all__ = ["MLflow"]

_FN = "penwatch.sinks.MLflow"
_FEATURE = "pw.sinks.MLflow"

MAX_METRICS_PER_CALL = 1000
"""MLflow's limit on metrics per ``log_batch`` call (also 100 params, 100 tags)."""
MAX_PARAMS_PER_CALL = 100
MAX_TAG_LENGTH = 5000
"""Tag values are cut to this many characters (MLflow's limit is 8,000; older 5,000)."""

_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_key(name: str) -> str:
    """A metric/tag name MLflow accepts: characters outside ``[A-Za-z0-9_-. :/]`` -> ``_``."""
    return _BAD_CHARS.sub("_", name)


class MLflow(Sink):
    """Logs every step, event and the run configuration to an MLflow tracking run.

    * every metric of a step as an MLflow metric ``<pipeline>/<key>`` at that step (NaN
      kept; MLflow stores ±Inf as ±1.8e308), and the device time as
      ``penwatch/duration_seconds``; keys are made MLflow-safe by :func:`mlflow_key`;
    * every event (non-finite report, alert, dropped records) as a tag
      ``penwatch.<kind>.<name>`` holding the latest one (``step 10 [warning] NonFinite:
      ...``) and a metric ``penwatch/<kind>_events`` counting them at their steps;
    * the run configuration and identity as params (flattened, ``.``-joined keys), and
      the end as the run's status (``FINISHED``, ``KILLED`` when stopped, ``FAILED``).

    Records go in batches through ``MlflowClient.log_batch`` (at most 1,000 metrics a
    call). When the tracking server cannot be reached (or the store is locked) the
    batch stays in this sink's outage buffer and is retried; records already logged by
    a partly failed batch are not logged twice. A record MLflow refuses
    (``INVALID_PARAMETER_VALUE``) is dropped alone and counted as poison. Each request's
    own retries and timeout are MLflow's (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
    ``MLFLOW_HTTP_REQUEST_TIMEOUT``); they happen on this sink's thread, never in
    training.

    Args:
      tracking_uri: where runs go (``http://host:5000``, ``sqlite:///mlflow.db``, ...);
        None: MLflow's default (``MLFLOW_TRACKING_URI``).
      experiment: the experiment name (created when missing).
      run_name: the MLflow run name (default: the monitor's run, with ``/p<process>``
        for processes other than 0).
      run_id: log into this existing run instead of creating one.
      tags: extra tags of the run.
      batch_size: most records per batch.
      max_delay: seconds a record waits at most for its batch.
      max_pending: most records kept while the tracking server is unreachable.

    Example::

        monitor = pw.Monitor("exp1", sinks=[pw.sinks.MLflow(tracking_uri="http://mlflow:5000")])
    """

    name = "MLflow"

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        experiment: str = "penwatch",
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        batch_size: int = 64,
        max_delay: float = 1.0,
        max_pending: int = 10_000,
    ) -> None:
        for option, value in (("tracking_uri", tracking_uri), ("run_name", run_name)):
            if value is not None and not isinstance(value, str):
                raise _checks.option_error(_FN, option, value, "a string or None")
        if not isinstance(experiment, str) or not experiment:
            raise _checks.option_error(_FN, "experiment", experiment, "a non-empty string")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise _checks.option_error(_FN, "run_id", run_id, "an MLflow run id or None")
        if tags is not None and not isinstance(tags, Mapping):
            raise _checks.option_error(_FN, "tags", tags, "a mapping {name: value} or None")
        mlflow = _extras.require("mlflow.tracking", extra="mlflow", feature=_FEATURE)
        from mlflow import entities
        from mlflow.exceptions import MlflowException

        self._mle = entities
        self._error = MlflowException
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.batch_size = _checks.check_int(_FN, "batch_size", batch_size, min=1)
        self.max_delay = _checks.check_nonnegative(_FN, "max_delay", max_delay)
        self.max_pending = _checks.check_int(_FN, "max_pending", max_pending, min=1)
        # records of a partly logged batch, by id (held, so an id cannot be reused)
        self._logged: dict[int, StepRecord] = {}
        self._event_counts: dict[str, int] = {}
        self._params_logged = False

    # -- the sink hooks ----------------------------------------------------------------

    def open(self, info: RunInfo) -> None:
        """Find or create the experiment and the run; log the configuration as params."""
        with self._calls("open"):
            if self.run_id is None:
                exp = self.client.get_experiment_by_name(self.experiment)
                exp_id = (
                    exp.experiment_id
                    if exp is not None
                    else self.client.create_experiment(self.experiment)
                )
                name = self.run_name or (
                    info.run if info.process == 0 else f"{info.run}/p{info.process}"
                )
                tags = {"penwatch.run": info.run, "penwatch.process": str(info.process)}
                run = self.client.create_run(exp_id, run_name=name, tags={**tags, **self.tags})
                self.run_id = run.info.run_id
            if not self._params_logged:
                params = [
                    self._mle.Param(mlflow_key(k)[:250], str(v)[:6000])
                    for k, v in hparam_values(info).items()
                ]
                for i in range(0, len(params), MAX_PARAMS_PER_CALL):
                    self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_PER_CALL])
                self._params_logged = True

    def write_step(self, record: StepRecord) -> None:
        self.write_steps((record,))

    def write_steps(self, records: Sequence[StepRecord]) -> None:
        """Log records in calls of at most 1,000 metrics, whole records per call."""
        todo = [r for r in records if id(r) not in self._logged]
        chunk: list[Any] = []
        chunk_records: list[StepRecord] = []
        for record in todo:
            metrics = self._metrics(record)
            if chunk and len(chunk) + len(metrics) > MAX_METRICS_PER_CALL:
                self._log_metrics(chunk, chunk_records)
                chunk, chunk_records = [], []
            chunk += metrics
            chunk_records.append(record)
        if chunk:
            self._log_metrics(chunk, chunk_records)
        self._logged.clear()  # the whole batch is in: its records leave the buffer

    def write_event(self, event: Event) -> None:
        kind = mlflow_key(event.kind)
        count = self._event_counts.get(kind, 0) + 1
        tag = self._mle.RunTag(
            mlflow_key(f"penwatch.{event.kind}.{event.name}")[:250],
            event_text(event)[:MAX_TAG_LENGTH],
        )
        metric = self._mle.Metric(
            f"penwatch/{kind}_events", float(count), int(event.wall_time * 1000), event.step
        )
        with self._calls("write_event"):
            self.client.log_batch(self.run_id, metrics=[metric], tags=[tag])
        self._event_counts[kind] = count

    def close(self, *, status: RunStatus = "finished") -> None:
        """End the MLflow run with the matching status."""
        if self.run_id is None:
            return
        with self._calls("close"):
            self.client.set_terminated(self.run_id, _STATUS.get(status, "FINISHED"))

    # -- helpers -----------------------------------------------------------------------

    def _metrics(self, record: StepRecord) -> list[Any]:
        Metric = self._mle.Metric
        ms = int(record.wall_time * 1000)
        out = [
            Metric(mlflow_key(f"{record.pipeline}/{key}"), float(value), ms, record.step)
            for key, value in record.values.items()
        ]
        if record.duration_seconds is not None:
            out.append(
                Metric("penwatch/duration_seconds", record.duration_seconds, ms, record.step)
            )
        return out

    def _log_metrics(self, metrics: list[Any], records: list[StepRecord]) -> None:
        with self._calls("write_steps"):
            self.client.log_batch(self.run_id, metrics=metrics)
        self._logged.update((id(r), r) for r in records)

    def _calls(self, what: str) -> _Classify:
        return _Classify(self._error, what)


class _Classify:
    """Turns MLflow's errors into the sink protocol: a refused value is a bad record
    (``ValueError``: dropped alone), anything else (unreachable, 5xx, locked) an outage."""

    def __init__(self, error: type[Exception], what: str) -> None:
        self.error, self.what = error, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc is None or not isinstance(exc, self.error):
            return False
        if getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE":
            raise ValueError(f"{_FN}: MLflow refused {self.what}: {exc}") from exc
        raise SinkUnavailable(f"{_FN}: {self.what} failed: {exc}") from exc
