"""The training loop: data → head surgery → LoRA → epochs → best run saved.

One readable path (nanoGPT style). Speed comes from the data side: every image is
decoded once into a uint8 tensor at working size, and augmentation (random resized crop
+ flip + normalise) runs per batch as torch ops, so the model never waits for JPEG
decoding. Works unchanged under `torchrun`/`accelerate launch` (DDP; `--batch-size` is
the global batch, split across processes).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import __version__
from .artifacts import check_out_dir, move_files_into, staging_dir, write_bytes_atomic, write_json_atomic
from .config import TrainConfig
from .errors import VitloraError
from .extend import Extender, imprint_new_rows, lora_lr_scale, prepare_extend
from .modeling import RUN_MARKER, load_base, load_processor_config, parameter_counts, wrap_lora
from .runtime import Runtime, adapt_threads, barrier, setup, teardown
from .speed import micro_batch_size, release_memory, use_fast_lora_dropout
from .surgery import HeadChange, extend_head, replace_head
from .targets import resolve_targets

CHECKPOINT = Path("checkpoints") / "last" / "state.pt"


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


def default_out_dir(config: TrainConfig) -> str:
    name = Path(config.data.rstrip("/")).stem or "data"
    return str(Path("runs") / f"{name}-{config.label or config.mode or 'run'}")


def _prepare_out(config: TrainConfig, resume: bool, overwrite: bool, rt: Runtime) -> Path:
    out = Path(config.out or default_out_dir(config))
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise VitloraError(f"nothing to resume in {out}: no {CHECKPOINT} (start without --resume)")
        return out
    check_out_dir(out, overwrite)
    if rt.is_main and out.is_dir() and overwrite:
        import shutil

        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    barrier(rt)
    return out


def _resume_config(out: Path, given: TrainConfig) -> TrainConfig:
    from .run import read_run_files

    meta, _ = read_run_files(out) if (out / RUN_MARKER).is_file() else ({}, {})
    saved = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    config = TrainConfig.from_dict(saved["config"]) if "config" in saved else TrainConfig.from_dict(meta["config"])
    config.out = str(out)
    if given.epochs != config.epochs:
        config.epochs = given.epochs  # allow extending a finished run with more epochs
    return config


def _schedule(total_steps: int, warmup: float) -> Callable[[int], float]:
    warm = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(model: torch.nn.Module, config: TrainConfig, lora_scale: float = 1.0) -> torch.optim.Optimizer:
    decay, no_decay, lora = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if lora_scale != 1.0 and "lora_" in name:  # LoRA weights at lr * lora_scale (extend mode: 0.1)
                lora.append(p)
            else:
                (no_decay if p.ndim < 2 or getattr(p, "no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if lora:
        groups.append({"params": lora, "weight_decay": config.weight_decay, "lr": config.lr * lora_scale})
    return torch.optim.AdamW(groups, lr=config.lr)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.inference_mode()
def evaluate_cache(model: torch.nn.Module, cache: Any, pp: Any, rt: Runtime, batch_size: int = 64) -> torch.Tensor:
    """Logits [N, C] (float32, CPU) for every image of an eval cache."""
    from .data import normalize

    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, len(cache), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(cache)))
        images, _ = cache.batch(idx)
        x = normalize(images.to(rt.device, non_blocking=True), pp)
        with rt.autocast():
            outs.append(model(pixel_values=x).logits.float().cpu())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def _save_adapter(peft_model: Any, out: Path) -> None:
    with staging_dir(out) as tmp:
        peft_model.save_pretrained(str(tmp))
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's stub card; we write our own
        move_files_into(tmp, out)


def _write_checkpoint(out: Path, model: torch.nn.Module, opt: Any, sched: Any, gen: torch.Generator,
                      state: TrainState, config: TrainConfig) -> None:
    import io

    payload = {
        "config": config.to_dict(),
        "trainable": _trainable_state(model),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
        "state": state.__dict__,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(out / CHECKPOINT, buf.getvalue())


def _metrics_doc(state: TrainState, extra: dict[str, Any]) -> dict[str, Any]:
    return {"epochs": state.history, "best_epoch": state.best_epoch,
            "best_val_accuracy": next((e.get("val_accuracy") for e in state.history
                                       if e["epoch"] == state.best_epoch), None), **extra}


def train(
    config: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    load_run: bool = True,
) -> "Any":
    """Fine-tune with LoRA as `config` says; returns the loaded best `Run`.

    `load_run=False` returns the run directory (a `Path`) instead: the CLI does not need the
    model back, and loading it again costs seconds of a short run's wall time.

    `on_epoch_end(record)` is called on the main process after each epoch's checkpoint is
    written (so raising from it, e.g. KeyboardInterrupt, simulates an interruption).
    """
    from tqdm.auto import tqdm

    from .data import build_cache, discover, random_resized_crop_flip, stratified_split
    from .data.transforms import Preprocess
    from .metrics import classification_report

    t_start = time.time()
    config.validate()
    rt = setup(config.device, config.precision)
    try:
        out = _prepare_out(config, resume, overwrite, rt)
        if resume:
            config = _resume_config(out, config)
        config.out = str(out)
        log(rt, f"vitlora {__version__}: device {rt.device}, precision {rt.precision} ({rt.reason})"
            + (f", {rt.world_size} processes" if rt.distributed else ""))

        # ---- data -------------------------------------------------------------------------
        source = discover(config.data, label=config.label)
        mode = config.mode or ("extend" if config.label else "replace")
        if config.val:
            val_source = discover(config.val, label=config.label)
            train_samples, val_samples = source.samples, val_source.samples
            unknown = sorted(set(val_source.labels) - set(source.labels))
            if unknown:
                raise VitloraError(f"--val has labels the training data lacks: {', '.join(unknown)}")
        else:
            train_samples, val_samples = stratified_split(source.samples, config.val_split, config.seed)
        data_labels = list(source.labels)

        # ---- model: base, head surgery, LoRA ---------------------------------------------
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        model, base_info = load_base(config.model, "cpu")
        processor_cfg = load_processor_config(config.model)
        pp = Preprocess.from_dict(processor_cfg)
        from .run import base_fingerprint

        fingerprint = base_fingerprint(model)
        change: HeadChange = (extend_head if mode == "extend" else replace_head)(model, data_labels)
        if change.matched:
            log(rt, f"{len(change.matched)} of {len(data_labels)} labels match base classes "
                    f"({', '.join(f'{k}→{v}' for k, v in list(change.matched.items())[:5])}"
                    f"{', …' if len(change.matched) > 5 else ''}): their head rows start from the base")
        label2id = change.data_label2id()
        targets = resolve_targets(model, config.targets, change.head_name)
        model.config._name_or_path = base_info["base_model"]  # recorded in adapter_config.json
        peft_model = wrap_lora(model, targets, change.head_name, config.rank, config.alpha, config.dropout)
        use_fast_lora_dropout(peft_model)  # same dropout, without PEFT's CPU cost (see vitlora.speed)
        trainable, total = parameter_counts(peft_model)
        log(rt, f"{mode} mode: {len(change.labels)} labels ({len(change.new_labels)} new), LoRA r={config.rank} "
                f"on {', '.join(targets)}; trainable params: {trainable:,} || all params: {total:,} "
                f"|| trainable%: {100 * trainable / total:.4f}")
        peft_model.to(rt.device)

        # ---- decode once -------------------------------------------------------------------
        train_cache, train_report = build_cache(train_samples, label2id, pp, train=True, strict=config.strict,
                                                progress=progress and rt.is_main)
        val_cache, val_report = (build_cache(val_samples, label2id, pp, train=False, strict=config.strict,
                                             progress=progress and rt.is_main, draft=False)
                                 if val_samples else (None, None))
        for report in (train_report, val_report):
            if report is not None and report.count:
                log(rt, "warning: " + report.summary())
        n_train, n_val = len(train_cache), (len(val_cache) if val_cache is not None else 0)
        log(rt, f"data: {n_train} training images, {n_val} validation images, {len(data_labels)} labels "
                f"from {config.data}")
        threads_note = adapt_threads(rt)  # before the first model passes: the cores others leave free
        if threads_note:
            log(rt, threads_note)

        # ---- new head rows start at class-mean features; extend-mode safeguards (vitlora.extend)
        base_out = imprint_new_rows(peft_model, change, train_cache, pp, rt.device, lambda m: log(rt, m))
        ext: Extender | None = None
        if mode == "extend":
            ext = prepare_extend(peft_model, change, config, train_cache, val_cache, base_out, pp, rt.device,
                                 lambda m: log(rt, m), progress and rt.is_main, rt.rank)

        # ---- optimisation ------------------------------------------------------------------
        per_rank_batch = max(1, config.batch_size // rt.world_size)
        negatives = ext is not None and getattr(ext, "neg_train", None) is not None  # each step doubles
        micro = max(1, micro_batch_size(peft_model, per_rank_batch * (2 if negatives else 1), rt.device)
                    // (2 if negatives else 1))
        if micro < per_rank_batch:
            log(rt, f"each batch of {per_rank_batch} runs as {math.ceil(per_rank_batch / micro)} micro-batches "
                    f"of <= {micro} (activation memory; VITLORA_ACTIVATION_MB raises the budget)")
        release_memory()  # what set-up freed (decoding, set-up passes) goes back to the OS before the steps
        steps_per_epoch = math.ceil(math.ceil(n_train / (per_rank_batch * rt.world_size)) / config.grad_accum)
        opt = _optimizer(peft_model, config, lora_lr_scale(config, mode))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps_per_epoch * config.epochs, config.warmup))
        gen = torch.Generator().manual_seed(config.seed)
        state = TrainState()
        if resume:
            saved = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
            params = dict(peft_model.named_parameters())
            with torch.no_grad():
                for name, value in saved["trainable"].items():
                    params[name].copy_(value)
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            gen.set_state(saved["generator"])
            torch.set_rng_state(saved["torch_rng"])
            if saved.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
            random.setstate(saved["python_rng"])
            state = TrainState(**saved["state"])
            log(rt, f"resuming after epoch {state.epoch} of {config.epochs}")
        net: torch.nn.Module = peft_model
        if rt.distributed:
            net = torch.nn.parallel.DistributedDataParallel(
                peft_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        scaler = torch.amp.GradScaler("cuda") if rt.precision == "fp16" else None

        meta = {
            "vitlora_version": __version__,
            "config": config.to_dict(),
            "mode": mode,
            "base_model": base_info["base_model"],
            "stacked_on": base_info.get("stacked_on"),
            "base_fingerprint": fingerprint,
            "head": change.head_name,
            "target_modules": targets,
            "labels": change.labels if len(change.labels) <= 50 else None,
            "num_labels": len(change.labels),
            "new_labels": change.new_labels,
            "matched_labels": change.matched,
            "processor": processor_cfg,
            "precision": rt.precision,
            "device": str(rt.device),
            "world_size": rt.world_size,
            "trainable_params": trainable,
            "total_params": total,
            "data": {"train": config.data, "val": config.val, "n_train": n_train, "n_val": n_val,
                     "skipped": train_report.count + (val_report.count if val_report else 0)},
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "peft": __import__("peft").__version__},
        }
        labels_info = {
            "mode": mode,
            "id2label": {str(i): lab for i, lab in enumerate(change.labels)},
            "label2id": {lab: i for i, lab in enumerate(change.labels)},
            "base_num_labels": change.base_num_labels,
            "new_labels": change.new_labels,
            "data_label2id": label2id,
        }
        id2label = dict(enumerate(change.labels))

        # ---- epochs ------------------------------------------------------------------------
        total_steps = steps_per_epoch * config.epochs
        bar = tqdm(total=total_steps, initial=steps_per_epoch * state.epoch, disable=not (progress and rt.is_main),
                   unit="step", dynamic_ncols=True, file=sys.stderr)
        stop = False
        for epoch in range(state.epoch + 1, config.epochs + 1):
            net.train()
            bar.set_description(f"epoch {epoch}/{config.epochs}")
            threads_note = adapt_threads(rt)  # CPU: use the cores other processes leave free
            if threads_note and rt.is_main:
                bar.write(threads_note)
            seen, loss_sum, loss_n = 0, 0.0, 0
            t_epoch = time.time()
            batches = list(_batches(n_train, per_rank_batch, gen, rt))
            for i, idx in enumerate(batches):
                last_micro = (i + 1) % config.grad_accum == 0 or i + 1 == len(batches)
                parts = idx.split(micro)  # CPU: equal micro-batches that fit the activation budget
                for j, part in enumerate(parts):
                    images, labels = train_cache.batch(part)
                    images = images.to(rt.device, non_blocking=True)
                    labels = labels.to(rt.device, non_blocking=True)
                    x = random_resized_crop_flip(images, pp, scale=(config.aug_scale_min, 1.0), generator=gen)
                    if ext is not None:  # + negatives (label -1) and the frozen base's old-class logits
                        x, labels, teacher = ext.batch(x, labels, part, epoch, i * len(parts) + j, gen)
                    sync = net.no_sync() if (rt.distributed and not (last_micro and j + 1 == len(parts))) else _null()
                    with sync:
                        with rt.autocast():
                            logits = net(pixel_values=x).logits
                        loss = (ext.loss(logits.float(), labels, teacher) if ext is not None else
                                F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing))
                        scaled = loss * (len(part) / len(idx)) / config.grad_accum
                        (scaler.scale(scaled) if scaler else scaled).backward()
                    loss_sum += float(loss.detach()) * len(part)
                if last_micro:
                    if scaler:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                    bar.update(1)
                seen += len(idx) * rt.world_size
                loss_n += len(idx)
                rate = seen / max(1e-9, time.time() - t_epoch)
                bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}", img_s=f"{rate:.1f}")
            train_s = time.time() - t_epoch
            record: dict[str, Any] = {"epoch": epoch, "train_loss": _mean_across(loss_sum, loss_n, rt),
                                      "images_per_s": seen / max(1e-9, train_s), "train_s": train_s}
            # evaluation on the main process; the decision is broadcast so ranks stay in step.
            # score = [what "best" means, tie-break]: accuracy then lower val loss (a small
            # validation set often reaches 100 % in epoch 1; the later, lower-loss epoch is better);
            # extend mode has its own score (vitlora.extend) and keeps the earliest on ties.
            score = torch.tensor([0.0, 0.0], dtype=torch.float64)
            if rt.is_main and val_cache is not None:
                logits = evaluate_cache(peft_model, val_cache, pp, rt)
                rep = classification_report(logits, val_cache.labels, id2label)
                record.update({"val_loss": rep["nll"], "val_accuracy": rep["accuracy"],
                               "val_macro_f1": rep["macro_f1"]})
                score[0], score[1] = rep["accuracy"], -rep["nll"]
                if ext is not None:  # new-class recall; FP rate and retention on held-out negatives
                    record.update(ext.validate(logits))
                    score[0], score[1] = ext.score(record), 0.0
            elif rt.is_main:
                score[0] = float(epoch)  # no validation data: the last epoch is the best
            if rt.distributed:
                torch.distributed.broadcast(score, src=0)
            record["wall_s"] = time.time() - t_start
            primary, tiebreak = float(score[0]), float(score[1])
            improved = primary > state.best_score or (primary == state.best_score and tiebreak > state.best_tiebreak)
            if improved:
                state.best_score, state.best_tiebreak, state.best_epoch, state.bad_epochs = primary, tiebreak, epoch, 0
            else:
                state.bad_epochs += 1
            state.epoch = epoch
            state.history.append(record)
            if rt.is_main:
                if improved:
                    _save_adapter(peft_model, out)
                    write_json_atomic(out / "labels.json", labels_info)
                    write_json_atomic(out / "preprocessor_config.json", processor_cfg)
                    write_json_atomic(out / RUN_MARKER, {**meta, "best_epoch": epoch})
                write_json_atomic(out / "metrics.json", _metrics_doc(state, {"precision": rt.precision}))
                _write_checkpoint(out, peft_model, opt, sched, gen, state, config)
                bar.write(_epoch_line(record, config.epochs, improved))
            if config.early_stopping and state.bad_epochs >= config.early_stopping:
                log(rt, f"early stopping: no improvement for {state.bad_epochs} epochs")
                stop = True
            if rt.is_main and on_epoch_end is not None:
                on_epoch_end(record)
            barrier(rt)
            if stop:
                break
        bar.close()
        if rt.is_main and ext is not None:  # best epoch back, new-class bias calibrated, summary printed
            meta["extend"] = ext.finish(out)
            _save_adapter(peft_model, out)
            write_json_atomic(out / RUN_MARKER, {**meta, "best_epoch": state.best_epoch})
        if rt.is_main:
            finalize_run(out, state, meta, labels_info, t_start, rt)
        barrier(rt)
    finally:
        teardown(rt)
    if not load_run:
        return out
    from .run import load

    return load(out, device=str(rt.device) if rt.device.type == "cuda" else "cpu")


def finalize_run(out: Path, state: TrainState, meta: dict[str, Any], labels_info: dict[str, Any],
                 t_start: float, rt: Runtime) -> None:
    """metrics.json, curves and model card, once training ends."""
    from .card import render_model_card
    from .plots import plot_training_curves

    doc = _metrics_doc(state, {"precision": rt.precision, "wall_s": time.time() - t_start,
                               "mean_images_per_s": sum(e["images_per_s"] for e in state.history)
                               / max(1, len(state.history)),
                               **({"extend": meta["extend"]} if meta.get("extend") else {})})
    write_json_atomic(out / "metrics.json", doc)
    plot_training_curves(state.history, out / "training_curves.png")
    labels = [labels_info["id2label"][str(i)] for i in range(len(labels_info["id2label"]))]
    card = render_model_card(meta["config"] | {"mode": meta["mode"], "target_modules": meta["target_modules"]},
                             doc, labels, meta["base_model"], new_labels=labels_info["new_labels"])
    write_bytes_atomic(out / "README.md", card.encode())
    log(rt, f"saved run to {out} (best epoch {state.best_epoch}, "
            f"val accuracy {doc['best_val_accuracy'] if doc['best_val_accuracy'] is not None else 'n/a'}, "
            f"{doc['wall_s']:.1f} s)")


def _epoch_line(r: dict[str, Any], epochs: int, improved: bool) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}", f"train_loss {r['train_loss']:.4f}"]
    if "val_loss" in r:
        parts += [f"val_loss {r['val_loss'] + 0.0:.4f}", f"val_acc {r['val_accuracy']:.4f}"]
    for key, name in (("new_class_recall", "recall"), ("false_positive_rate", "fp_rate"), ("retention", "retention")):
        if r.get(key) is not None:
            parts.append(f"{name} {r[key]:.4f}")
    parts += [f"{r['images_per_s']:.1f} img/s", f"{r['wall_s']:.1f} s"]
    return "  ".join(parts) + ("  *best*" if improved else "")


def _mean_across(total: float, n: int, rt: Runtime) -> float:
    if rt.distributed:
        t = torch.tensor([total, float(n)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        total, n = float(t[0]), int(t[1])
    return total / max(1, n)


def _batches(n: int, per_rank_batch: int, gen: torch.Generator, rt: Runtime):
    from .data import iterate_batches

    return iterate_batches(n, per_rank_batch, shuffle=True, generator=gen, rank=rt.rank, world_size=rt.world_size)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
