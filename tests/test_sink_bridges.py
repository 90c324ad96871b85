"""Bridges to the trackers people already use (SPEC section 14): pw.sinks.TensorBoard read
back by TensorBoard's own EventAccumulator, pw.sinks.MLflow read back by MlflowClient from
a real local tracking store; a failing bridge never breaks training and its losses are
counted."""

from __future__ import annotations

import math
import sys
import time

import pytest

import penwatch as pw
from penwatch.alerts import Alert
from penwatch.store._synthetic import synthetic_record

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

STEPS, NAN_AT, ALERT_AT = 30, 12, 20
CONFIG = {"lr": 0.01, "model": {"hidden": 64, "act": "tanh"}, "seed": 3}


class FiresAt(Alert):
    """A real alert through the monitor's alert path, firing once at one step."""

    name = "TestAlert"

    def evaluate(self, record):
        if record.step == ALERT_AT:
            return [self._event(record, "the <b>test</b> alert fired", severity="critical")]
        return []


def _run(run: str, sink: pw.sinks.Sink, **monitor_options) -> tuple[pw.Monitor, list]:
    """Record STEPS synthetic steps (NaN at NAN_AT) into ``sink`` and a Callback."""
    seen: list = []
    monitor = pw.Monitor(
        run,
        sinks=[sink, pw.sinks.Callback(seen.append)],
        alerts=[pw.alerts.NonFinite(), FiresAt()],
        config=CONFIG,
        **monitor_options,
    )
    with monitor:
        for step in range(STEPS):
            values = synthetic_record(run, step, nan=step == NAN_AT).values
            monitor.record(step, dict(values), pipeline="main")
    assert len(seen) == STEPS
    return monitor, seen


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=0)


def _as_mlflow_stores(value: float) -> float:
    """MLflow keeps NaN but stores ±Inf as ±sys.float_info.max (documented)."""
    return math.copysign(sys.float_info.max, value) if math.isinf(value) else value


def test_tensorboard_event_reader_reads_back_every_metric_nan_alert_and_hparams(tmp_path):
    logdir = tmp_path / "tb"
    monitor, seen = _run("tb-run", pw.sinks.TensorBoard(logdir))
    assert monitor.stats.sinks["TensorBoard"].written == STEPS
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for record in seen:
        for key in record.values:
            assert f"main/{key}" in scalars, key
    for key in seen[0].values:
        events = acc.Scalars(f"main/{key}")
        assert [e.step for e in events] == list(range(STEPS)), key
        for event, record in zip(events, seen, strict=True):
            assert _same(event.value, record.values[key]), (key, record.step)
    nan_keys = [k for k, v in seen[NAN_AT].values.items() if math.isnan(v)]
    assert nan_keys and all(math.isnan(acc.Scalars(f"main/{k}")[NAN_AT].value) for k in nan_keys)

    def texts(tag: str) -> list[tuple[int, str]]:
        return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]

    tags = set(acc.Tags()["tensors"])
    assert {"penwatch/nonfinite/NonFinite", "penwatch/alert/TestAlert"} <= tags, tags
    ((step, text),) = texts("penwatch/alert/TestAlert")
    assert step == ALERT_AT and text.startswith(f"step {ALERT_AT} [critical] TestAlert:")
    assert "the <b>test</b> alert fired" in text
    ((step, text),) = texts("penwatch/nonfinite/NonFinite")
    assert text.startswith(f"step {NAN_AT} ") and seen[NAN_AT].nonfinite[0].key in text
    ((step, text),) = texts("penwatch/nonfinite")  # the step's own non-finite keys
    assert step == NAN_AT and f"first offender {seen[NAN_AT].nonfinite[0].key}" in text
    assert texts("penwatch/status")[-1][1] == "run ended: finished"

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(0.01)
    assert hparams["model.hidden"].number_value == 64
    assert hparams["model.act"].string_value == "tanh"
    assert hparams["penwatch.run"].string_value == "tb-run"


def test_tensorboard_unwritable_logdir_never_breaks_training_and_counts_losses(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    sink = pw.sinks.TensorBoard(blocker / "tb", max_pending=10)  # mkdir fails: an outage
    monitor, _ = _run("tb-broken", sink, close_timeout=3.0)
    stats = monitor.stats.sinks["TensorBoard"]
    assert stats.written == 0 and stats.errors >= 1
    assert stats.received == stats.written + sum(stats.lost.values()) == STEPS
    assert stats.lost["overflow"] == STEPS - 10 and stats.lost["unfinished"] == 10
    assert monitor.stats.lost("TensorBoard") == STEPS
    assert monitor.stats.sinks["Callback"].written == STEPS  # the others are untouched


def test_mlflow_client_reads_back_every_metric_nan_alert_params_and_status(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sink = pw.sinks.MLflow(tracking_uri=uri, experiment="bridges", batch_size=7)
    monitor, seen = _run("ml-run", sink)
    assert monitor.stats.sinks["MLflow"].written == STEPS
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bridges").experiment_id])
    assert run.info.run_name == "ml-run" and run.info.status == "FINISHED"
    for key in seen[0].values:
        history = sorted(client.get_metric_history(run.info.run_id, f"main/{key}"), key=_by_step)
        assert [m.step for m in history] == list(range(STEPS)), key  # each step once
        for metric, record in zip(history, seen, strict=True):
            assert _same(metric.value, _as_mlflow_stores(record.values[key])), (key, record.step)
            assert metric.timestamp == int(record.wall_time * 1000)
    nan_keys = [k for k, v in seen[NAN_AT].values.items() if math.isnan(v)]
    for key in nan_keys:
        history = sorted(client.get_metric_history(run.info.run_id, f"main/{key}"), key=_by_step)
        assert math.isnan(history[NAN_AT].value)
    tags = run.data.tags
    assert tags["penwatch.alert.TestAlert"].startswith(f"step {ALERT_AT} [critical] TestAlert:")
    assert tags["penwatch.nonfinite.NonFinite"].startswith(f"step {NAN_AT} ")
    assert seen[NAN_AT].nonfinite[0].key in tags["penwatch.nonfinite.NonFinite"]
    (count,) = client.get_metric_history(run.info.run_id, "penwatch/alert_events")
    assert (count.step, count.value) == (ALERT_AT, 1.0)
    params = run.data.params
    assert params["lr"] == "0.01" and params["model.hidden"] == "64"
    assert params["model.act"] == "tanh" and params["penwatch.run"] == "ml-run"


def _by_step(metric):
    return metric.step


def test_mlflow_partly_failed_batch_is_retried_without_duplicates(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sink = pw.sinks.MLflow(tracking_uri=uri, experiment="retry")
    calls = {"n": 0}
    log_batch = sink.client.log_batch

    def flaky(run_id, metrics=(), params=(), tags=()):
        calls["n"] += 1
        if metrics and calls["n"] % 3 == 0:  # every third call: the server is gone
            raise sink._error("connection refused", error_code="TEMPORARILY_UNAVAILABLE")
        return log_batch(run_id, metrics=metrics, params=params, tags=tags)

    sink.client.log_batch = flaky
    monkeypatch.setattr("penwatch.sinks._mlflow.MAX_METRICS_PER_CALL", 100)  # calls per batch
    monitor, _ = _run("ml-retry", sink)
    stats = monitor.stats.sinks["MLflow"]
    assert stats.written == STEPS and stats.errors >= 1
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(sink.run_id, "main/base_loss")
    assert sorted(m.step for m in history) == list(range(STEPS))


def test_mlflow_unreachable_tracking_server_never_breaks_training(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    sink = pw.sinks.MLflow(tracking_uri="http://127.0.0.1:1", max_pending=8)
    monitor, _ = _run("ml-down", sink, close_timeout=3.0)
    stats = monitor.stats.sinks["MLflow"]
    assert stats.written == 0 and stats.errors >= 1
    assert stats.received == sum(stats.lost.values()) == STEPS
    assert stats.lost["overflow"] == STEPS - 8
    assert monitor.stats.lost("MLflow") == STEPS
    assert monitor.stats.sinks["Callback"].written == STEPS


def test_bridges_validate_their_options(tmp_path):
    with pytest.raises(ValueError, match="TensorBoard: argument 'logdir'"):
        pw.sinks.TensorBoard("")
    with pytest.raises(ValueError, match="batch_size"):
        pw.sinks.TensorBoard(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="MLflow: option 'experiment'"):
        pw.sinks.MLflow(experiment="")
    with pytest.raises(ValueError, match="max_pending"):
        pw.sinks.MLflow(tracking_uri=f"sqlite:///{tmp_path / 'x.db'}", max_pending=0)
    with pytest.raises(ValueError, match="WandB: option 'mode'"):
        pw.sinks.WandB(mode="cloud")


def test_tensorboard_disk_full_mid_batch_is_cut_off_and_retried_without_duplicates(
    tmp_path, monkeypatch
):
    import penwatch.sinks._tensorboard as mod

    real, calls = mod._write_all, {"n": 0}

    def disk_full_now_and_then(file, blob):
        calls["n"] += 1
        if calls["n"] % 3 == 0:  # half the batch reaches the file, then ENOSPC
            real(file, blob[: len(blob) // 2])
            raise OSError(28, "No space left on device")
        real(file, blob)

    monkeypatch.setattr(mod, "_write_all", disk_full_now_and_then)
    logdir = tmp_path / "tb"
    monitor, seen = _run("tb-full", pw.sinks.TensorBoard(logdir, batch_size=4, max_delay=0))
    stats = monitor.stats.sinks["TensorBoard"]
    assert stats.written == STEPS and stats.errors >= 1
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("main/base_loss")
    assert [e.step for e in events] == list(range(STEPS))
    assert [e.value for e in events] == pytest.approx([r.values["base_loss"] for r in seen])


def _wandb_complete_run_file(path, timeout: float = 60.0) -> list:
    """The run file's records once it holds the run's exit record.

    ``run.finish()`` can return before W&B's service process has written the file's last
    block (seen once under load: the last four history rows were missing), and no event
    says when it has, so the file is read again until the exit record is there.
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(_wandb_run_file_records(path))
        except DecodeError:  # a record cut at the end of what is written so far
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"no exit record in {path} after {timeout} s"
        time.sleep(0.05)


def _wandb_run_file_records(path):
    """The records of a W&B run file (``run-<id>.wandb``), parsed with W&B's own protocol
    buffers: a 7-byte ``:W&B`` header, then LevelDB log framing (32 KiB blocks; each
    fragment a CRC32C, a length, a type: full / first / middle / last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding to the block end
            pos += left
            continue
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last fragment of one
            yield wandb_internal_pb2.Record.FromString(pending + body)
            pending = b""
        else:
            pending += body


def test_wandb_offline_run_file_holds_every_metric_nan_alert_config_and_status(tmp_path):
    pytest.importorskip("wandb")
    import json

    sink = pw.sinks.WandB(project="bridges", mode="offline", dir=tmp_path)
    monitor, seen = _run("wb-run", sink)
    assert monitor.stats.sinks["WandB"].written == STEPS
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history: dict[int, dict[str, float]] = {}
    summary: dict[str, object] = {}
    config: dict[str, object] = {}
    exits = []
    for record in _wandb_complete_run_file(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                for i in record.history.item
            }
            history[items["_step"]] = items
        elif kind == "summary":
            for u in record.summary.update:
                summary["/".join(u.nested_key) or u.key] = json.loads(u.value_json)
        elif kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "exit":
            exits.append(record.exit.exit_code)
    assert sorted(history) == list(range(STEPS))
    for rec in seen:
        for key, value in rec.values.items():
            got = float(history[rec.step][f"main/{key}"])
            assert _same(got, value), (rec.step, key, got, value)
    assert any(math.isnan(float(history[NAN_AT][f"main/{k}"])) for k in seen[NAN_AT].values)
    alert = summary["penwatch.alert.TestAlert"]
    assert alert.startswith(f"step {ALERT_AT} [critical] TestAlert:")
    assert summary["penwatch.nonfinite.NonFinite"].startswith(f"step {NAN_AT} ")
    assert summary["penwatch.status"] == "finished" and exits == [0]
    assert config["lr"] == 0.01 and config["model.act"] == "tanh"
    assert config["penwatch.run"] == "wb-run"


def test_wandb_that_cannot_start_never_breaks_training(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    sink = pw.sinks.WandB(mode="online", dir=tmp_path, max_pending=5)
    monitor, _ = _run("wb-down", sink, close_timeout=3.0)
    stats = monitor.stats.sinks["WandB"]
    assert stats.written == 0 and stats.errors >= 1
    assert stats.received == sum(stats.lost.values()) == STEPS
    assert stats.lost["overflow"] == STEPS - 5
    assert monitor.stats.sinks["Callback"].written == STEPS
