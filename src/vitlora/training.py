"""`vitlora train`: set up, find the data, build the model, decode the data, fit, finish.

`train_to_dir` reads top to bottom as those phases, each a function here; the loop is
`vitlora.loop`, what gets written is `vitlora.persist`, extend mode's plug-in is
`vitlora.extend`. Speed comes from the data side: every image is decoded once into a uint8
tensor at working size, and augmentation (random resized crop + flip + normalise, and the
`--augment` policy / mixup / cutmix / erasing) runs per batch as torch ops, so the model never
waits for JPEG decoding.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .config import TrainConfig
from .errors import VitloraError
from .persist import (OutPlan, RunWriter, TrainState, discard_unresumable, log, open_staging, out_path, plan_out,
                      publish, read_checkpoint, resume_config)
from .rundir import check_out_dir, exclusive_lock
from .runtime import Runtime, adapt_threads, barrier, setup, teardown
from .surgery import HeadChange


@dataclass
class Session:
    """Set-up: the settings in force, where and how tensors run, the run folder, the checkpoint to resume."""

    config: TrainConfig
    rt: Runtime
    plan: OutPlan
    checkpoint: dict[str, Any] | None
    progress: bool
    t_start: float

    @property
    def out(self) -> Path:
        return self.plan.out

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


IMPRINT_PER_LABEL = 32  # replace mode: new head rows start at class means of this many base features per label


@dataclass
class Decoded:
    """The data phase: training and validation images decoded once, and what was skipped."""

    train: Any
    val: Any | None
    skipped: int
    imprint: Any = None  # what new head rows are imprinted from (default: `train`; shards: a bounded sample)

    @property
    def sample(self) -> Any:
        return self.imprint if self.imprint is not None else self.train


def start(config: TrainConfig, overwrite: bool, resume: bool, progress: bool, locks: contextlib.ExitStack) -> Session:
    """Validate settings, pick device and precision, lock and check the run folder (read the checkpoint to resume).

    Nothing is written here: the staging folder is created once the data and the model have loaded.
    """
    import vitlora.data  # noqa: F401  the clock (wall_s) starts once the decoding stack is imported

    t_start = time.time()
    config.validate()
    is_main = int(os.environ.get("RANK", "0")) == 0  # as `setup` will say; set by torchrun/accelerate
    check_out_dir(out_path(config), overwrite=True)  # a link, a path under a file: before the lock beside it
    if is_main:  # one trainer per --out: refused before anything is read or written
        locks.enter_context(exclusive_lock(out_path(config)))
    plan = plan_out(config, resume, overwrite, recover=is_main)
    checkpoint = read_checkpoint(plan.resume_from) if plan.resume_from is not None else None
    if checkpoint is not None:
        config = resume_config(checkpoint, plan.out, config)  # its device and precision too, so set up after
    config.out = str(plan.out)
    rt = setup(config.device, config.precision)
    locks.callback(teardown, rt)
    log(rt, f"vitlora {__version__}: device {rt.device}, precision {rt.precision} ({rt.reason})"
        + (f", {rt.world_size} processes" if rt.distributed else ""))
    return Session(config, rt, plan, checkpoint, progress, t_start)


def find_data(config: TrainConfig) -> tuple[list[str], Any, list[Any]]:
    """(labels, training samples, validation samples): `--val`, else a seeded stratified split of DATA.

    WebDataset shards come back as their `ShardSet` in place of the training samples (streamed, never
    listed); their validation share is a key hash (`vitlora.data.webdataset`) unless `--val` is given.
    """
    from . import multilabel as ml
    from .data import discover, stratified_split

    source = discover(config.data, label=config.label)
    if source.shards is not None:
        if config.resolved_mode == "extend":
            raise VitloraError("WebDataset shards train in replace mode only (extend mode keeps every training "
                               "image's base outputs, which a stream cannot)")
        if config.balanced_sampler or config.class_weights != "none":
            raise VitloraError("--balanced-sampler and --class-weights need every image's label up front; "
                               "WebDataset shards are streamed (write class-balanced shards instead)")
        val = discover(config.val, label=config.label).samples if config.val else []
        return list(source.labels), source.shards, val
    if ml.is_multi_label(source.samples):  # several labels per image: sigmoid + BCE (vitlora.multilabel)
        ml.check_mode(config.resolved_mode)
        if config.mixup or config.cutmix or config.balanced_sampler or config.class_weights != "none":
            raise VitloraError("--mixup, --cutmix, --balanced-sampler and --class-weights are for single-label runs")
    if not config.val:
        splitter = ml.split if ml.is_multi_label(source.samples) else stratified_split
        train_samples, val_samples = splitter(source.samples, config.val_split, config.seed)
        return list(source.labels), train_samples, val_samples
    val_source = discover(config.val, label=config.label)
    if ml.is_multi_label(val_source.samples):
        ml.check_mode(config.resolved_mode)
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
    from . import multilabel as ml
    from .data import build_cache as single_label_cache

    if not isinstance(train_samples, list):
        return stream_shards(s, built, train_samples, val_samples)
    label2id, show = built.change.data_label2id(), s.progress and s.rt.is_main
    multi = ml.is_multi_label([*train_samples, *val_samples])
    build_cache = ml.build_cache if multi else single_label_cache  # multi-label: multi-hot float targets
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
    # replace mode needs the base's features only for the new rows' class means: a bounded sample, as for
    # shards (extend mode keeps every positive: their base logits are the distillation targets)
    imprint = (train.per_label_sample(IMPRINT_PER_LABEL, s.config.seed)
               if s.config.resolved_mode == "replace" and not multi else None)
    return Decoded(train, val, train_report.count + (val_report.count if val_report else 0), imprint=imprint)


def stream_shards(s: Session, built: Built, shards: Any, val_samples: list[Any]) -> Decoded:
    """WebDataset shards: training images streamed each epoch (bounded memory), validation decoded once."""
    from .data import SkipReport, build_cache
    from .data.webdataset import ShardStream
    from .runtime import usable_cores

    label2id, vf = built.change.data_label2id(), 0.0 if val_samples else s.config.val_split
    train_report = SkipReport()
    train = ShardStream(shards, label2id, built.pp, vf, s.config.seed, s.rt.rank, s.rt.world_size,
                        max(1, usable_cores() // 2), train_report)
    if val_samples:
        val, val_report = build_cache(val_samples, label2id, built.pp, train=False, strict=s.config.strict,
                                      draft=False)
    else:
        val, val_report = (shards.decode_split("val", label2id, built.pp, vf, draft=False)
                           if vf > 0 and shards.count("val", vf) else (None, None))
    imprint, _ = shards.decode_split("train", label2id, built.pp, vf, train=True, per_label=IMPRINT_PER_LABEL)
    if val_report is not None and val_report.count:
        s.log("warning: " + val_report.summary())
    s.log(f"data: {len(train)} training images (streamed from {len(shards.shards)} shards each epoch), "
          f"{len(val) if val is not None else 0} validation images, {len(label2id)} labels from {s.config.data}")
    return Decoded(train, val, val_report.count if val_report else 0, imprint=imprint)


def prepare_head(s: Session, built: Built, data: Decoded) -> Any:
    """New head rows start at class-mean features (both modes); extend mode's hook (None in replace mode)."""
    from .extend import prepare_extend
    from .heads import imprint_new_rows, trainable_head
    from .multilabel import center_bias, is_multi_hot

    built.peft_model.to(s.rt.device)
    base_out = imprint_new_rows(built.peft_model, built.change, data.sample, built.pp, s.rt.device, s.log)
    if base_out is not None and is_multi_hot(data.sample):  # sigmoids start undecided (vitlora.multilabel)
        center_bias(trainable_head(built.peft_model, built.change.head_name), base_out.features, data.sample.labels)
    if s.config.resolved_mode != "extend":
        from .reject import prepare_reject  # --negatives: outlier exposure, then an "unknown" answer

        if s.config.negatives and is_multi_hot(data.sample):
            raise VitloraError("--negatives is for single-label runs (a multi-label run answers no label by itself)")

        return prepare_reject(built.peft_model, s.config, data.val, built.pp, s.rt.device, s.log,
                              s.progress and s.rt.is_main, s.rt.rank)
    return prepare_extend(built.peft_model, built.change, s.config, data.train, data.val, base_out, built.pp,
                          s.rt.device, s.log, s.progress and s.rt.is_main, s.rt.rank)


def run_files(s: Session, built: Built, data: Decoded) -> RunWriter:
    """What `vitlora.json` and `labels.json` will say about this run."""
    import peft
    import transformers

    from .multilabel import is_multi_hot, run_fields

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
    if is_multi_hot(data.train):  # problem_type + per-label thresholds (tuned on held-out data in the loop)
        labels_info.update(run_fields(change.labels))
        meta["problem_type"] = labels_info["problem_type"]
    return RunWriter(s.plan.staging, meta, labels_info, built.processor, rt.precision)


def finish(s: Session, writer: RunWriter, hook: Any, built: Built, data: Decoded, state: TrainState) -> None:
    """Best epoch back (as trained, never an already calibrated head) and calibrated (extend: out-of-fold
    threshold; replace: temperature, "unknown"); then metrics, curves and model card; then the swap into `--out`."""
    from .multilabel import is_multi_hot

    start = writer.uncalibrated()
    if s.config.resolved_mode == "extend":
        hook.out = writer.out  # what the run carries for later stacking is written beside the adapter
        writer.extend_summary(built.peft_model, hook.finish(start), state.best_epoch)
    elif not is_multi_hot(data.val):  # multi-label runs keep their sigmoids and tuned thresholds
        from .calibration import finish_replace
        from .heads import reload_best, trainable_head

        reload_best(built.peft_model, start)
        head = trainable_head(built.peft_model, built.change.head_name)
        summary, labels_info = finish_replace(built.peft_model, head, s.config, data.val, built.pp, s.rt.device,
                                              s.log, hook, writer.labels_info)
        writer.extend_summary(built.peft_model, summary, state.best_epoch, key="calibration", labels_info=labels_info)
    doc = writer.finish(state, s.t_start)
    publish(s.plan)
    acc = doc["best_val_accuracy"]
    s.log(f"saved run to {s.out} (best epoch {state.best_epoch}, "
          f"val accuracy {f'{acc:.4f}' if acc is not None else 'n/a'}, {doc['wall_s']:.1f} s)")


def nothing_to_resume(s: Session) -> bool:
    """`--resume` of a finished run that already has `--epochs` epochs: leave it exactly as it is."""
    if s.checkpoint is None or s.plan.resume_from != s.plan.out:
        return False
    done = int(s.checkpoint["state"]["epoch"])
    if done < s.config.epochs:
        return False
    s.log(f"{s.out} is a finished run of {done} epochs: nothing to resume (pass --epochs N above {done} "
          "to train it longer)")
    return True


def train_to_dir(
    config: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Fine-tune with LoRA as `config` says and write the run folder; returns it (the CLI's path: no reload).

    The run is built in a staging folder beside `--out` and swapped in when complete (see
    `vitlora.persist`); a second trainer on the same `--out` is refused while this one holds
    its lock. `on_epoch_end(record)` is called on the main process after each epoch's
    checkpoint is written (so raising from it, e.g. KeyboardInterrupt, simulates an interruption).
    """
    from .extend import lora_lr_scale
    from .loop import Job, fit

    with contextlib.ExitStack() as locks:
        s = start(config, overwrite, resume, progress, locks)
        if nothing_to_resume(s):
            return s.out
        labels, train_samples, val_samples = find_data(s.config)
        built = build_model(s.config, labels, s.log)
        data = decode_data(s, built, train_samples, val_samples)
        hook = prepare_head(s, built, data)
        writer = run_files(s, built, data)
        try:
            if s.rt.is_main:
                open_staging(s.plan)
            barrier(s.rt)
            job = Job(built.peft_model, data.train, data.val, built.pp, dict(enumerate(built.change.labels)), hook)
            state = fit(job, s.config, s.rt, writer, lora_lr_scale(s.config), s.checkpoint, progress, s.t_start,
                        on_epoch_end)
            if s.rt.is_main:
                finish(s, writer, hook, built, data, state)
            barrier(s.rt)
        except OSError as exc:  # disk full, permissions: the old run stays; a resumable checkpoint stays too
            if s.rt.is_main:
                discard_unresumable(s.plan)
            raise VitloraError(write_failure(exc, s.plan)) from None
        except BaseException:  # Ctrl-C, errors: finished epochs stay resumable, nothing else is left behind
            if s.rt.is_main:
                discard_unresumable(s.plan)
            raise
    return s.out


def write_failure(exc: OSError, plan: OutPlan) -> str:
    """One sentence for a failed write during training: what failed, and what was kept."""
    what = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    kept = (f"; the finished epochs are kept in {plan.staging}: free space and continue with --resume"
            if plan.staging.is_dir() else "")
    state = "unchanged" if plan.out.exists() else "not created"
    return f"cannot write the run ({what}); {plan.out} is {state}{kept}"


def train(config: TrainConfig, *, overwrite: bool = False, resume: bool = False, progress: bool = True,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Fine-tune with LoRA as `config` says; returns the best epoch's `vitlora.run.Run`, loaded."""
    from .run import load
    from .runtime import pick_device

    out = train_to_dir(config, overwrite=overwrite, resume=resume, progress=progress, on_epoch_end=on_epoch_end)
    device = pick_device(config.device)
    return load(out, device=str(device) if device.type == "cuda" else "cpu")
