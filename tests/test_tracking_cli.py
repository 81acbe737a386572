"""`vitlora train --report-to tensorboard,mlflow` on the tiny model, read back with each ecosystem's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitlora.cli import main

FAST = ["--epochs", "3", "--batch-size", "8", "--lr", "5e-3", "--quiet", "--rank", "4", "--alpha", "8",
        "--val-split", "0.25", "--precision", "fp32"]


def _search_runs(db: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db.resolve()}")
    try:
        return mlflow.search_runs(experiment_names=["vitlora"], order_by=["start_time ASC"])
    finally:
        mlflow.set_tracking_uri(None)


def test_train_reports_to_tensorboard_and_mlflow(tiny_model: Path, colour_folder: Path, tmp_path: Path,
                                                 monkeypatch, quiet_env) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = tmp_path / "run"
    assert main(["train", str(colour_folder), "--model", str(tiny_model), "--out", str(out),
                 "--report-to", "tensorboard,mlflow", *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    meta = json.loads((out / "vitlora.json").read_text())
    assert meta["config"]["report_to"] == ["tensorboard", "mlflow"]
    n_train = meta["data"]["n_train"]
    steps = 3 * -(-n_train // 8)
    sizes = ([8] * (n_train // 8) + ([n_train % 8] if n_train % 8 else [])) * 3

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    loss, lr = acc.Scalars("train/loss"), acc.Scalars("train/lr")
    assert [e.step for e in loss] == list(range(1, steps + 1)) == [e.step for e in lr]
    assert lr[0].value == pytest.approx(5e-3) and lr[-1].value < lr[0].value  # warmup of 1 step, then cosine
    per_epoch = steps // 3
    for epoch in metrics["epochs"]:  # step losses, weighted by their images, make up the epoch's train loss
        chunk = range((epoch["epoch"] - 1) * per_epoch, epoch["epoch"] * per_epoch)
        weighted = sum(loss[i].value * sizes[i] for i in chunk) / sum(sizes[i] for i in chunk)
        assert weighted == pytest.approx(epoch["train_loss"], rel=1e-5)
    tb_acc = [(e.step, e.value) for e in acc.Scalars("epoch/val_accuracy")]
    assert tb_acc == [(e["epoch"], pytest.approx(e["val_accuracy"])) for e in metrics["epochs"]]

    runs = _search_runs(out / "mlflow.db")
    assert list(runs["status"]) == ["FINISHED"]
    run = runs.iloc[0]
    assert run["params.method"] == "lora" and run["params.lr"] == "0.005"
    history = MlflowClient(f"sqlite:///{(out / 'mlflow.db').resolve()}").get_metric_history(
        run["run_id"], "epoch/val_loss")
    assert sorted((m.step, m.value) for m in history) == [(e["epoch"], pytest.approx(e["val_loss"]))
                                                           for e in metrics["epochs"]]


def test_interrupted_run_is_marked_failed(tiny_model: Path, colour_folder: Path, tmp_path: Path,
                                          monkeypatch, quiet_env) -> None:
    pytest.importorskip("mlflow")
    from vitlora.config import TrainConfig
    from vitlora.persist import staging_path
    from vitlora.training import train_to_dir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = tmp_path / "run"
    config = TrainConfig(data=str(colour_folder), model=str(tiny_model), out=str(out), epochs=3, batch_size=8,
                         rank=4, alpha=8.0, precision="fp32", report_to=["mlflow"])

    def interrupt(record: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_to_dir(config, progress=False, on_epoch_end=interrupt)
    # the unfinished run stays in its staging folder beside --out (kept for --resume), its MLflow store with it
    assert list(_search_runs(staging_path(out) / "mlflow.db")["status"]) == ["FAILED"]


def test_unknown_backend_is_refused_before_training(tiny_model: Path, colour_folder: Path, tmp_path: Path,
                                                    capsys, quiet_env) -> None:
    assert main(["train", str(colour_folder), "--model", str(tiny_model), "--out", str(tmp_path / "x"),
                 "--report-to", "wandb", *FAST]) == 2
    assert "unknown --report-to wandb" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
