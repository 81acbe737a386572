"""What training writes: the output folder, resumable checkpoints, the best epoch's files, the finished run.

A run is built in a staging folder beside `--out` (`.NAME.staging`, same filesystem) and
swapped in by rename only when complete, calibration and model card included: a kill or a
full disk at any point leaves the previous run at `--out` as it was. Every check (flags,
data, model) happens before the staging folder is created. The staging folder is also where
an interrupted run's checkpoint lives: `--resume` continues from it (or, to train a finished
run longer, from a copy of the run). File names and atomic writes come from `vitlora.rundir`.

A checkpoint holds only tensors and plain containers (RNG states as tensors) and is read with
`torch.load(weights_only=True)`: a run folder is something people download and share, and a
pickle could run any code.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .errors import VitloraError
from .rundir import (
    ADAPTER_WEIGHTS,
    CARD,
    CHECKPOINT,
    CURVES,
    LABELS,
    METRICS,
    PREPROCESSOR,
    RUN_MARKER,
    check_out_dir,
    is_run_dir,
    move_files_into,
    publish_dir,
    recover_publish,
    remove_tree,
    staging_dir,
    write_bytes_atomic,
    write_json_atomic,
)
from .runtime import Runtime


def log(rt: Runtime, message: str) -> None:
    if rt.is_main:
        print(message, file=sys.stderr, flush=True)


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights: enough to continue bit-for-bit."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -math.inf
    best_tiebreak: float = -math.inf  # replace mode: -val_loss, so equal accuracy keeps the more confident epoch
    bad_epochs: int = 0


# ---- the output folder and resuming ------------------------------------------------------


def default_out_dir(config: TrainConfig) -> str:
    name = Path(config.data.rstrip("/")).stem or "data"
    return str(Path("runs") / f"{name}-{config.label or config.mode or 'run'}")


BEST = Path("checkpoints") / "best"  # extend mode: the best epoch's adapter before calibration


def staging_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.staging")


@dataclass
class OutPlan:
    """Where a run is published (`out`), where it is built (`staging`), and the folder whose checkpoint is resumed."""

    out: Path
    staging: Path
    resume_from: Path | None = None


def out_path(config: TrainConfig) -> Path:
    return Path(config.out or default_out_dir(config)).expanduser()


def plan_out(config: TrainConfig, resume: bool, overwrite: bool, recover: bool = True) -> OutPlan:
    """Check where the run will go and what `--resume` continues; touches nothing (call it holding the lock).

    `--overwrite` replaces only a vitlora run or an empty folder; a stale staging folder (a
    killed run) must be resumed or explicitly overwritten.
    """
    out = out_path(config)
    check_out_dir(out, overwrite=True)  # symlinks, paths under a file, non-folders
    if recover:
        recover_publish(out)  # a swap cut short by a kill: the old run back in place
    staging = staging_path(out)
    if resume:
        for folder in (staging, out):
            if (folder / CHECKPOINT).is_file():
                return OutPlan(out, staging, folder)
        raise VitloraError(f"nothing to resume in {out}: no {CHECKPOINT} (start without --resume)")
    if (staging.exists() or staging.is_symlink()) and not overwrite:
        raise VitloraError(f"an interrupted run of {out} is in {staging}: continue it with --resume, or pass "
                           "--overwrite to start over")
    check_out_dir(out, overwrite)
    if out.is_dir() and any(out.iterdir()) and not is_run_dir(out):
        raise VitloraError(f"--out {out} is not a vitlora run (no {RUN_MARKER}); --overwrite only replaces a run "
                           "or an empty folder, choose another folder")
    return OutPlan(out, staging)


def open_staging(plan: OutPlan) -> None:
    """The run's first write, after every check: a fresh staging folder, or a copy of the finished run to extend."""
    if plan.resume_from == plan.staging:
        return
    remove_tree(plan.staging)
    if plan.resume_from is None:
        plan.staging.mkdir()
        return
    copy = plan.staging.with_name(plan.staging.name + "-copy")  # a half copy never poses as a resumable run
    remove_tree(copy)
    try:
        shutil.copytree(plan.resume_from, copy, symlinks=True)
        os.replace(copy, plan.staging)
    except BaseException:
        remove_tree(copy)
        raise


def publish(plan: OutPlan) -> None:
    """Swap the complete staged run in at `--out` (the old run is deleted only after the swap)."""
    out = plan.out
    if out.is_dir() and any(out.iterdir()) and not is_run_dir(out):
        raise VitloraError(f"--out {out} was filled with other files during training; the new run is kept in "
                           f"{plan.staging}")
    publish_dir(plan.staging, out)


def discard_unresumable(plan: OutPlan) -> None:
    """After a failed run: keep the staging folder only if it holds a checkpoint to resume."""
    if plan.resume_from != plan.staging and plan.staging.is_dir() and not (plan.staging / CHECKPOINT).is_file():
        remove_tree(plan.staging)


def read_checkpoint(out: Path) -> dict[str, Any]:
    """The checkpoint of a run folder; tensors and plain data only (nothing in it can run code)."""
    path = out / CHECKPOINT
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitloraError(f"cannot load {path}: not a vitlora checkpoint, or it holds more than tensors and "
                           f"plain data ({first[:160]})") from None
    if not isinstance(payload, dict) or "trainable" not in payload or "state" not in payload:
        raise VitloraError(f"cannot load {path}: not a vitlora checkpoint")
    return payload


def resume_config(payload: dict[str, Any], out: Path, given: TrainConfig) -> TrainConfig:
    """The interrupted run's settings (from its checkpoint), with `given.epochs` to allow training longer."""
    config = TrainConfig.from_dict(payload["config"])
    config.out = str(out)
    config.epochs = given.epochs
    return config


def write_checkpoint(out: Path, model: nn.Module, opt: Any, sched: Any, gen: torch.Generator,
                     state: TrainState, config: TrainConfig) -> None:
    version, mt, gauss = random.getstate()
    payload = {
        "config": config.to_dict(),
        "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python_rng": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "state": state.__dict__,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(out / CHECKPOINT, buf.getvalue())


def restore_checkpoint(payload: dict[str, Any], model: nn.Module, opt: Any, sched: Any,
                       gen: torch.Generator) -> TrainState:
    """Put weights, optimizer, schedule and every RNG back where the checkpoint left them."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in payload["trainable"].items():
            params[name].copy_(value)
    opt.load_state_dict(payload["optimizer"])
    sched.load_state_dict(payload["scheduler"])
    gen.set_state(payload["generator"])
    torch.set_rng_state(payload["torch_rng"])
    if payload.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    py = payload["python_rng"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"])
    random.setstate(py)
    return TrainState(**payload["state"])


# ---- the run's files -----------------------------------------------------------------------


def metrics_doc(state: TrainState, extra: dict[str, Any]) -> dict[str, Any]:
    return {"epochs": state.history, "best_epoch": state.best_epoch,
            "best_val_accuracy": next((e.get("val_accuracy") for e in state.history
                                       if e["epoch"] == state.best_epoch), None), **extra}


@dataclass
class RunWriter:
    """Writes a run folder as training goes: the best epoch's files, per-epoch metrics and checkpoint, the end."""

    out: Path
    meta: dict[str, Any]  # vitlora.json without best_epoch
    labels_info: dict[str, Any]  # labels.json
    processor: dict[str, Any]  # preprocessor_config.json
    precision: str

    def save_adapter(self, peft_model: Any, folder: Path | None = None) -> None:
        folder = folder or self.out
        with staging_dir(folder) as tmp:
            peft_model.save_pretrained(str(tmp))
            (tmp / CARD).unlink(missing_ok=True)  # PEFT's stub card; we write our own
            move_files_into(tmp, folder)

    def uncalibrated(self) -> Path:
        """The folder whose adapter calibration starts from: always the best epoch as trained, so a resumed
        finish never calibrates an already calibrated head twice (runs from before `checkpoints/best`: the run)."""
        return self.out / BEST if (self.out / BEST / ADAPTER_WEIGHTS).is_file() else self.out

    def best(self, peft_model: Any, epoch: int) -> None:
        """A new best epoch: the adapter (also kept uncalibrated in checkpoints/best), labels, preprocessing, marker."""
        self.save_adapter(peft_model)
        self.save_adapter(peft_model, self.out / BEST)  # as trained: calibration (both modes) starts from it
        write_json_atomic(self.out / LABELS, self.labels_info)
        write_json_atomic(self.out / PREPROCESSOR, self.processor)
        write_json_atomic(self.out / RUN_MARKER, {**self.meta, "best_epoch": epoch})

    def epoch(self, state: TrainState, model: nn.Module, opt: Any, sched: Any, gen: torch.Generator,
              config: TrainConfig) -> None:
        write_json_atomic(self.out / METRICS, metrics_doc(state, {"precision": self.precision}))
        write_checkpoint(self.out, model, opt, sched, gen, state, config)

    def extend_summary(self, peft_model: Any, summary: dict[str, Any], best_epoch: int, key: str = "extend",
                       labels_info: dict[str, Any] | None = None) -> None:
        """Training's end: the calibrated adapter, its summary under `key` in `vitlora.json` (and new labels)."""
        self.meta[key] = summary
        if labels_info is not None:  # replace mode with --negatives: "unknown" appended
            self.labels_info = labels_info
            labels = [labels_info["id2label"][str(i)] for i in range(len(labels_info["id2label"]))]
            self.meta.update(num_labels=len(labels), labels=labels if len(labels) <= 50 else None)
            write_json_atomic(self.out / LABELS, labels_info)
        self.save_adapter(peft_model)
        write_json_atomic(self.out / RUN_MARKER, {**self.meta, "best_epoch": best_epoch})

    def finish(self, state: TrainState, t_start: float) -> dict[str, Any]:
        """metrics.json, curves and model card, once training ends; returns the metrics."""
        from .card import render_model_card
        from .plots import plot_training_curves

        meta, labels_info = self.meta, self.labels_info
        doc = metrics_doc(state, {"precision": self.precision, "wall_s": time.time() - t_start,
                                  "mean_images_per_s": sum(e["images_per_s"] for e in state.history)
                                  / max(1, len(state.history)),
                                  **{k: meta[k] for k in ("extend", "calibration") if meta.get(k)}})
        write_json_atomic(self.out / METRICS, doc)
        plot_training_curves(state.history, self.out / CURVES)
        labels = [labels_info["id2label"][str(i)] for i in range(len(labels_info["id2label"]))]
        card = render_model_card(meta["config"] | {"mode": meta["mode"], "target_modules": meta["target_modules"]},
                                 doc, labels, meta["base_model"], new_labels=labels_info["new_labels"])
        write_bytes_atomic(self.out / CARD, card.encode())
        return doc
