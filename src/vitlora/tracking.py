"""Experiment tracking: `--report-to tensorboard,mlflow`, written with each ecosystem's own library.

The training loop talks to one `Tracker`; it fans out to the requested backends. Both are
optional extras and off by default. What is logged, under the same names in both:

    settings           the run's TrainConfig (TensorBoard: a text summary; MLflow: params)
    train/loss, train/lr        per optimizer step (step = global step, 1-based)
    epoch/<key>                 per epoch, every number in the epoch record (val_accuracy, ...)

Only the main process logs (`enabled=rt.is_main`); every rank still validates the names, so
a mistake stops all ranks before training. A backend that fails mid-run (disk full, locked
database) is dropped with one warning: tracking must never cost the training run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Sequence

from .errors import VitloraError

# backend name -> (module that must be importable, pip extra)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
MLFLOW_EXPERIMENT = "vitlora"
_MLFLOW_FLUSH_EVERY = 200  # step metrics are buffered and sent in batches (one DB write each)


def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """`"tensorboard,mlflow"` -> ["tensorboard", "mlflow"]; "" / "none" -> []; checks names and packages."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    names = list(dict.fromkeys(n.strip().lower() for n in items if n.strip() and n.strip().lower() != "none"))
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise VitloraError(f"unknown --report-to {', '.join(unknown)}: choose from {', '.join(BACKENDS)} or none")
    for name in names:
        module, extra = BACKENDS[name]
        if find_spec(module) is None:
            raise VitloraError(f"--report-to {name} needs the {module} package: pip install 'vitlora[{extra}]'")
    return names


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of an epoch record (nested dicts, strings, None and the epoch left out)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class _TensorBoard:
    """`torch.utils.tensorboard.SummaryWriter` writing to `<run>/tensorboard`."""

    def __init__(self, config: dict[str, Any], out_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self.writer.add_text("settings", "```\n" + text + "\n```", global_step=0)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"epoch/{key}", value, epoch)
        self.writer.flush()  # a crash later still leaves every finished epoch on disk

    def finish(self, ok: bool) -> None:
        self.writer.close()


class _MLflow:
    """One MLflow run; local sqlite store in `<run>/mlflow.db` unless MLFLOW_TRACKING_URI is set."""

    def __init__(self, config: dict[str, Any], out_dir: Path) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read once, when mlflow is imported
        from mlflow.entities import Metric, Param
        from mlflow.telemetry import set_telemetry_client
        from mlflow.tracking import MlflowClient

        set_telemetry_client()  # re-reads the switch, in case mlflow was imported before us
        for name in ("mlflow", "alembic"):  # after the import, which sets mlflow's level: a fresh
            logging.getLogger(name).setLevel(logging.WARNING)  # database logs its migrations at INFO

        self._metric, self._pending = Metric, []
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mlflow's own deprecation chatter, not the user's concern
            self.client = MlflowClient(tracking_uri=uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT)
            found = self.client.get_experiment_by_name(name)
            local = not os.environ.get("MLFLOW_TRACKING_URI")
            artifacts = (out_dir / "mlflow-artifacts").resolve().as_uri() if local else None
            exp_id = found.experiment_id if found else self.client.create_experiment(name, artifacts)
            self.run_id = self.client.create_run(exp_id, run_name=out_dir.name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in sorted(config.items())]
        self.client.log_batch(self.run_id, params=params)

    def _add(self, key: str, value: float, step: int) -> None:
        self._pending.append(self._metric(key, value, int(time.time() * 1000), step))
        if len(self._pending) >= _MLFLOW_FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        while self._pending:  # log_batch takes at most 1000 metrics
            batch, self._pending = self._pending[:1000], self._pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self._add("train/loss", loss, step)
        self._add("train/lr", lr, step)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._add(f"epoch/{key}", value, epoch)
        self._flush()

    def finish(self, ok: bool) -> None:
        self._flush()
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


_CLASSES = {"tensorboard": _TensorBoard, "mlflow": _MLflow}


class Tracker:
    """What the training loop calls; a no-op when nothing is requested or `enabled` is False.

    Use as a context manager (or call `finish`) so an interrupted run is marked FAILED.
    """

    def __init__(self, report_to: str | Sequence[str] | None, enabled: bool = True) -> None:
        self.names = parse_report_to(report_to)  # every rank: a bad name stops all before training
        self.enabled = enabled
        self._backends: dict[str, Any] = {}

    def start(self, config: dict[str, Any], out_dir: str | Path) -> None:
        """Open each backend; `config` is the run's settings (TrainConfig.to_dict())."""
        if not self.enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            try:
                self._backends[name] = _CLASSES[name](config, out)
            except ImportError as exc:
                raise VitloraError(f"--report-to {name}: cannot import it ({exc})") from None

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self._each("log_step", step, float(loss), float(lr))

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        self._each("log_epoch", epoch, _numbers(metrics))

    def finish(self, ok: bool = True) -> None:
        self._each("finish", ok)
        self._backends.clear()

    def _each(self, method: str, *args: Any) -> None:
        for name, backend in list(self._backends.items()):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # noqa: BLE001 - tracking never stops training
                print(f"warning: --report-to {name} stopped logging: {type(exc).__name__}: {exc}", file=sys.stderr)
                del self._backends[name]

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.finish(ok=exc_type is None)
