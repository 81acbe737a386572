"""--report-to: what the loop logs is read back with TensorBoard's reader and mlflow.search_runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitlora.errors import VitloraError
from vitlora.tracking import Tracker, parse_report_to

SETTINGS = {"lr": 0.002, "targets": ["query", "value"], "val": None, "epochs": 2}
STEPS = [(s, 2.0 / s, 1e-3 * min(1.0, s / 4)) for s in range(1, 13)]  # (step, loss, lr)
EPOCHS = [{"epoch": 1, "train_loss": 0.9, "val_accuracy": 0.5, "val_loss": None, "per_class": {"a": 1.0}},
          {"epoch": 2, "train_loss": 0.4, "val_accuracy": 0.75, "val_loss": 0.6, "best": True}]


def _log_run(tracker: Tracker, out: Path, fail: bool = False) -> None:
    with tracker:
        tracker.start(SETTINGS, out)
        for epoch, record in enumerate(EPOCHS, 1):
            for step, loss, lr in STEPS[(epoch - 1) * 6 : epoch * 6]:
                tracker.log_step(step, loss, lr)
            tracker.log_epoch(epoch, record)
        if fail:
            raise KeyboardInterrupt


def test_names_are_checked_before_training(monkeypatch):
    assert parse_report_to("") == [] and parse_report_to("none") == [] and parse_report_to(None) == []
    assert parse_report_to(" TensorBoard,mlflow,tensorboard ") == ["tensorboard", "mlflow"]
    with pytest.raises(VitloraError, match="unknown --report-to wandb"):
        Tracker("tensorboard,wandb")
    monkeypatch.setattr("vitlora.tracking.find_spec", lambda name: None if name == "mlflow" else object())
    with pytest.raises(VitloraError, match=r"pip install 'vitlora\[mlflow\]'"):
        Tracker("mlflow", enabled=False)  # every rank checks, not only the main one


def test_disabled_tracker_writes_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("vitlora.tracking.find_spec", lambda name: object())  # without the extras too
    _log_run(Tracker("tensorboard,mlflow", enabled=False), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_tensorboard_events_read_back(tmp_path: Path):
    pytest.importorskip("tensorboard")  # an optional extra
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_run(Tracker("tensorboard"), tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    loss, lr = acc.Scalars("train/loss"), acc.Scalars("train/lr")
    assert [e.step for e in loss] == [s for s, _, _ in STEPS]
    assert [e.value for e in loss] == pytest.approx([v for _, v, _ in STEPS])
    assert [e.value for e in lr] == pytest.approx([v for _, _, v in STEPS])
    assert [(e.step, e.value) for e in acc.Scalars("epoch/val_accuracy")] == [(1, 0.5), (2, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("epoch/val_loss")] == [(2, pytest.approx(0.6))]  # None skipped
    assert {"epoch/per_class", "epoch/best", "epoch/epoch"}.isdisjoint(acc.Tags()["scalars"])
    settings = acc.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"lr": 0.002' in settings


def test_mlflow_runs_read_back_quietly_and_offline(tmp_path: Path, monkeypatch, capfd):
    import socket

    mlflow = pytest.importorskip("mlflow")  # an optional extra
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("MLflow tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    out = tmp_path / "run"
    _log_run(Tracker("mlflow"), out)
    with pytest.raises(KeyboardInterrupt):
        _log_run(Tracker("mlflow"), out, fail=True)  # a second run into the same store, interrupted
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # no INFO lines, no warnings

    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["vitlora"], order_by=["start_time ASC"])
    finally:
        mlflow.set_tracking_uri(None)
    assert list(runs["status"]) == ["FINISHED", "FAILED"]
    done = runs.iloc[0]
    assert done["params.lr"] == "0.002" and done["params.targets"] == "['query', 'value']"
    assert done["metrics.epoch/val_accuracy"] == 0.75 and done["metrics.train/loss"] == pytest.approx(2.0 / 12)
    history = MlflowClient(uri).get_metric_history(done["run_id"], "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(v)) for s, v, _ in STEPS]
    assert [m.step for m in MlflowClient(uri).get_metric_history(done["run_id"], "epoch/val_loss")] == [2]
    assert not Path("mlruns").exists() or Path("mlruns").resolve().is_relative_to(tmp_path)


def test_a_failing_backend_is_dropped_not_fatal(tmp_path: Path, capsys):
    pytest.importorskip("tensorboard")
    tracker = Tracker("tensorboard")
    tracker.start(SETTINGS, tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    tracker._backends["tensorboard"].writer.add_scalar = broken
    tracker.log_step(1, 0.5, 1e-3)
    tracker.log_step(2, 0.4, 1e-3)  # no second warning, no exception
    tracker.finish()
    assert capsys.readouterr().err.count("stopped logging: OSError: disk full") == 1
