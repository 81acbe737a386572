"""`vitlora train`: set up, find the data, build the model, decode the data, fit, finish.

`train_to_dir` reads top to bottom as those phases, each a function here; the loop is
`vitlora.loop`, what gets written is `vitlora.persist`, extend mode's plug-in is
`vitlora.extend`. Speed comes from the data side: every image is decoded once into a uint8
tensor at working size, and augmentation (random resized crop + flip + normalise, and the
`--augment` policy / mixup / cutmix / erasing) runs per batch as torch ops, so the model never
waits for JPEG decoding.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .config import TrainConfig
from .errors import VitloraError
from .persist import RunWriter, TrainState, log, prepare_out, read_checkpoint, resume_config
from .runtime import Runtime, adapt_threads, barrier, setup, teardown
from .surgery import HeadChange


@dataclass
class Session:
    """Set-up: the settings in force, where and how tensors run, the run folder, the checkpoint to resume."""

    config: TrainConfig
    rt: Runtime
    out: Path
    checkpoint: dict[str, Any] | None
    progress: bool
    t_start: float

    def log(self, message: str) -> None:
        log(self.rt, message)


@dataclass
class Built:
    """The model phase: the LoRA-wrapped model and what was done to its head."""

    peft_model: Any
    change: HeadChange
    targets: list[str]
    pp: Any  # vitlora.data.Preprocess
    processor: dict[str, Any]
    base_info: dict[str, Any]
    fingerprint: dict[str, Any]
    trainable: int
    total: int


@dataclass
class Decoded:
    """The data phase: training and validation images decoded once, and what was skipped."""

    train: Any
    val: Any | None
    skipped: int


def start(config: TrainConfig, overwrite: bool, resume: bool, progress: bool) -> Session:
    """Validate settings, pick device and precision, prepare the run folder (and read the checkpoint to resume)."""
    import vitlora.data  # noqa: F401  the clock (wall_s) starts once the decoding stack is imported

    t_start = time.time()
    config.validate()
    rt = setup(config.device, config.precision)
    try:
        out = prepare_out(config, resume, overwrite, rt)
        checkpoint = read_checkpoint(out) if resume else None
        if checkpoint is not None:
            config = resume_config(checkpoint, out, config)
        config.out = str(out)
    except BaseException:
        teardown(rt)
        raise
    log(rt, f"vitlora {__version__}: device {rt.device}, precision {rt.precision} ({rt.reason})"
        + (f", {rt.world_size} processes" if rt.distributed else ""))
    return Session(config, rt, out, checkpoint, progress, t_start)


def find_data(config: TrainConfig) -> tuple[list[str], list[Any], list[Any]]:
    """(labels, training samples, validation samples): `--val`, else a seeded stratified split of DATA."""
    from .data import discover, stratified_split

    source = discover(config.data, label=config.label)
    if not config.val:
        train_samples, val_samples = stratified_split(source.samples, config.val_split, config.seed)
        return list(source.labels), train_samples, val_samples
    val_source = discover(config.val, label=config.label)
    unknown = sorted(set(val_source.labels) - set(source.labels))
    if unknown:
        raise VitloraError(f"--val has labels the training data lacks: {', '.join(unknown)}")
    return list(source.labels), source.samples, val_source.samples


def build_model(config: TrainConfig, data_labels: list[str], log: Callable[[str], None] = lambda m: None) -> Built:
    """Base model, head surgery for `data_labels` (replace or extend), LoRA on the targets; seeded by `config.seed`."""
    from .data import Preprocess
    from .lora import parameter_counts, use_fast_lora_dropout, wrap_lora
    from .modeling import base_fingerprint, load_base, load_processor_config
    from .surgery import extend_head, replace_head
    from .targets import resolve_targets

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, base_info = load_base(config.model, "cpu")
    processor = load_processor_config(config.model)
    fingerprint = base_fingerprint(model)
    change = (extend_head if config.resolved_mode == "extend" else replace_head)(model, data_labels)
    if change.matched:
        shown = ", ".join(f"{k}→{v}" for k, v in list(change.matched.items())[:5])
        log(f"{len(change.matched)} of {len(data_labels)} labels match base classes "
            f"({shown}{', …' if len(change.matched) > 5 else ''}): their head rows start from the base")
    targets = resolve_targets(model, config.targets, change.head_name)
    model.config._name_or_path = base_info["base_model"]  # recorded in adapter_config.json
    peft_model = wrap_lora(model, targets, change.head_name, config.rank, config.alpha, config.dropout, config.method)
    use_fast_lora_dropout(peft_model)  # same dropout, without PEFT's CPU cost (see vitlora.lora)
    trainable, total = parameter_counts(peft_model)
    log(f"{config.resolved_mode} mode: {len(change.labels)} labels ({len(change.new_labels)} new), {config.method} "
        f"r={config.rank} on {', '.join(targets)}; trainable params: {trainable:,} || all params: {total:,} "
        f"|| trainable%: {100 * trainable / total:.4f}")
    return Built(peft_model, change, targets, Preprocess.from_dict(processor), processor, base_info, fingerprint,
                 trainable, total)


def decode_data(s: Session, built: Built, train_samples: list[Any], val_samples: list[Any]) -> Decoded:
    """Decode every image once at working size (uint8 caches); skipped files are reported, not fatal."""
    from .data import build_cache

    label2id, show = built.change.data_label2id(), s.progress and s.rt.is_main
    train, train_report = build_cache(train_samples, label2id, built.pp, train=True, strict=s.config.strict,
                                      progress=show)
    val, val_report = (build_cache(val_samples, label2id, built.pp, train=False, strict=s.config.strict,
                                   progress=show, draft=False) if val_samples else (None, None))
    for report in (train_report, val_report):
        if report is not None and report.count:
            s.log("warning: " + report.summary())
    s.log(f"data: {len(train)} training images, {len(val) if val is not None else 0} validation images, "
          f"{len(label2id)} labels from {s.config.data}")
    threads_note = adapt_threads(s.rt)  # before the first model passes: the cores others leave free
    if threads_note:
        s.log(threads_note)
    return Decoded(train, val, train_report.count + (val_report.count if val_report else 0))


def prepare_head(s: Session, built: Built, data: Decoded) -> Any:
    """New head rows start at class-mean features (both modes); extend mode's hook (None in replace mode)."""
    from .extend import prepare_extend
    from .heads import imprint_new_rows

    built.peft_model.to(s.rt.device)
    base_out = imprint_new_rows(built.peft_model, built.change, data.train, built.pp, s.rt.device, s.log)
    if s.config.resolved_mode != "extend":
        return None
    return prepare_extend(built.peft_model, built.change, s.config, data.train, data.val, base_out, built.pp,
                          s.rt.device, s.log, s.progress and s.rt.is_main, s.rt.rank)


def run_files(s: Session, built: Built, data: Decoded) -> RunWriter:
    """What `vitlora.json` and `labels.json` will say about this run."""
    import peft
    import transformers

    config, change, rt = s.config, built.change, s.rt
    meta = {
        "vitlora_version": __version__, "config": config.to_dict(), "mode": config.resolved_mode,
        "base_model": built.base_info["base_model"], "stacked_on": built.base_info.get("stacked_on"),
        "base_fingerprint": built.fingerprint, "head": change.head_name, "target_modules": built.targets,
        "labels": change.labels if len(change.labels) <= 50 else None, "num_labels": len(change.labels),
        "new_labels": change.new_labels, "matched_labels": change.matched, "processor": built.processor,
        "precision": rt.precision, "device": str(rt.device), "world_size": rt.world_size,
        "trainable_params": built.trainable, "total_params": built.total,
        "data": {"train": config.data, "val": config.val, "n_train": len(data.train),
                 "n_val": len(data.val) if data.val is not None else 0, "skipped": data.skipped},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }
    labels_info = {
        "mode": config.resolved_mode,
        "id2label": {str(i): lab for i, lab in enumerate(change.labels)},
        "label2id": {lab: i for i, lab in enumerate(change.labels)},
        "base_num_labels": change.base_num_labels,
        "new_labels": change.new_labels,
        "data_label2id": change.data_label2id(),
    }
    return RunWriter(s.out, meta, labels_info, built.processor, rt.precision)


def finish(s: Session, writer: RunWriter, hook: Any, built: Built, state: TrainState) -> None:
    """Extend mode: best epoch back and calibrated; then metrics, curves and model card."""
    if hook is not None:
        writer.extend_summary(built.peft_model, hook.finish(s.out), state.best_epoch)
    doc = writer.finish(state, s.t_start)
    acc = doc["best_val_accuracy"]
    s.log(f"saved run to {s.out} (best epoch {state.best_epoch}, "
          f"val accuracy {acc if acc is not None else 'n/a'}, {doc['wall_s']:.1f} s)")


def train_to_dir(
    config: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Fine-tune with LoRA as `config` says and write the run folder; returns it (the CLI's path: no reload).

    `on_epoch_end(record)` is called on the main process after each epoch's checkpoint is
    written (so raising from it, e.g. KeyboardInterrupt, simulates an interruption).
    """
    from .extend import lora_lr_scale
    from .loop import Job, fit

    s = start(config, overwrite, resume, progress)
    try:
        labels, train_samples, val_samples = find_data(s.config)
        built = build_model(s.config, labels, s.log)
        data = decode_data(s, built, train_samples, val_samples)
        hook = prepare_head(s, built, data)
        writer = run_files(s, built, data)
        job = Job(built.peft_model, data.train, data.val, built.pp, dict(enumerate(built.change.labels)), hook)
        state = fit(job, s.config, s.rt, writer, lora_lr_scale(s.config), s.checkpoint, progress, s.t_start,
                    on_epoch_end)
        if s.rt.is_main:
            finish(s, writer, hook, built, state)
        barrier(s.rt)
    finally:
        teardown(s.rt)
    return s.out


def train(config: TrainConfig, *, overwrite: bool = False, resume: bool = False, progress: bool = True,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Fine-tune with LoRA as `config` says; returns the best epoch's `vitlora.run.Run`, loaded."""
    from .run import load
    from .runtime import pick_device

    out = train_to_dir(config, overwrite=overwrite, resume=resume, progress=progress, on_epoch_end=on_epoch_end)
    device = pick_device(config.device)
    return load(out, device=str(device) if device.type == "cuda" else "cpu")
