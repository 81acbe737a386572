"""Extend mode: add classes to a classifier without breaking what it already knew.

Trained on photos of the new class only with plain cross-entropy (the DeiT-tiny lab's
recipe), a model learns "everything is a raccoon": nothing in the loss says where the new
class ends, and nothing keeps the old classes' behaviour. What the training loop does in
extend mode instead (the math is in `vitlora.extend_math`, the head helpers in `vitlora.heads`;
`prepare_extend` builds the `Extender`, a hook the training loop calls - `batch`, `loss`,
`validate`, `score`, `finish` - and which knows nothing of the loop itself):

* **Imprinting** (`imprint_rows`, both modes): a new head row starts as the mean of the
  L2-normalised penultimate features (the head's input) of its training images under the
  frozen base, rescaled to the median norm of the base's rows; its bias is the base's mean
  bias. The new class starts as a sensible nearest-class-mean detector instead of a random
  direction. In replace mode the same initialises the rows of labels the base does not know
  (rows of known labels are copied from the base by `surgery.replace_head`).
* **Frozen old rows**: the head's base rows and biases get zero gradient, so old classes only
  change through LoRA's feature updates, which distillation holds in place.
* **Distillation** (`extend_loss`): the frozen base (adapter disabled: PEFT's
  `disable_adapter()` also swaps the trained head copy back to the original) gives soft
  targets over the old classes. Positives: cross-entropy on their label plus `--distill` x
  KL(base || student) over the old classes (renormalised), so a raccoon photo keeps looking
  "badger-like" among the old classes. Negatives (`--negatives`): the full soft
  cross-entropy against [base probabilities, 0 for every new class], which splits exactly
  into a rejection term -log(1 - p_new) plus the same old-class KL.
  Teacher outputs are computed **once per image** on the un-augmented view (negatives are
  trained on that same view) rather than on every augmented crop: measured on the raccoon
  benchmark it gave the same recall / false positives / retention as on-the-fly teacher
  passes while training ~35 % faster (see the measurements in the project notes / PR).
  `--temperature` softens both sides of the KL (default 1).
* **Calibration, out of fold** (`vitlora.crossfit`, default `--cv-folds 5`): after training,
  the new rows are refitted by the linear probe per fold on all photos' trained features and
  each new class's bias is shifted so that `--target-recall` of its out-of-fold margins
  (margin = its logit minus the best old logit) pass, with the split-conformal finite-sample
  rank; the summary is a cross-fitted estimate with its sample size. `--cv-folds 0` (or too
  few photos) falls back to `calibrate_thresholds` on the held-out positives only: then
  negatives are checked against the threshold, not used to move it, and the summary says
  those photos set it.
* **LoRA at a tenth of the learning rate** (`LORA_LR_SCALE`, `--lora-lr-scale`): Adam moves every LoRA weight
  by about the learning rate per step however small its gradient, and on ambiguous
  pictures (base top-1 probability ~0.3) that flips the old top-1 of 6-8 % of unseen
  negatives within one epoch at the full rate; at 0.1x none flipped (measured), while the
  new head rows still train at the full rate. The new class needs little from the
  backbone: the base's features already separate it (imprinting + a linear probe
  (`linear_probe`, `--lp-steps` / `--lp-lr`) on them come first).
* **Metrics** (`vitlora.evaluation.negative_metrics`, also each epoch on the validation split):
  `new_class_recall`, `false_positive_rate` (share of negatives predicted as any new class)
  and `retention` (share of negatives whose top-1 equals the base model's top-1).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .extend_math import (
    calibrate_thresholds,
    extend_loss,
    linear_probe,
    new_class_margins,
    shift_metrics,
)
from .heads import BaseOutputs, base_outputs, eval_view, freeze_rows, new_ids_of, reload_best, trainable_head
from .crossfit import exemplar_labels, load_exemplars, old_rows_logits, probe_row_limit
from .inference import cache_logits

LORA_LR_SCALE = 0.1  # extend mode: LoRA weights learn at this fraction of --lr unless --lora-lr-scale says otherwise


def negatives_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of one epoch's walk through the negatives on one rank, derived from `--seed` (distinct per epoch and rank)."""
    return seed * 1_000_003 + epoch * 7919 + rank * 104_729


def negative_indices(n: int, seed: int, epoch: int, rank: int, step: int, k: int) -> torch.Tensor:
    """k of n negatives for this step: a walk through per-epoch permutations, stateless (resume-exact)."""
    g = torch.Generator().manual_seed(negatives_seed(seed, epoch, rank))
    start = step * k
    reps = (start + k) // n + 1
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])
    return order[start : start + k]


def lora_lr_scale(config: Any) -> float:
    """LoRA's learning rate as a fraction of --lr: --lora-lr-scale, else LORA_LR_SCALE in extend mode, else 1."""
    if config.lora_lr_scale is not None:
        return float(config.lora_lr_scale)
    return LORA_LR_SCALE if config.resolved_mode == "extend" else 1.0


def split_negatives(paths: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out about `fraction` of the negatives, seeded like the positives' split.

    When they lie in 5 or more folders, whole folders are held out (for `vitlora.negatives`
    output: whole source images), so the held-out false-positive rate and retention are
    measured on pictures unlike any trained on, not on near-copies of them; otherwise files.
    """
    import os
    import random

    from .data import Sample, stratified_split

    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(os.path.dirname(p), []).append(p)
    if fraction <= 0 or len(groups) < 5:
        train, val = stratified_split([Sample(p, None) for p in paths], fraction, seed)
        return [s.path for s in train], [s.path for s in val]
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    target, held = max(1, round(fraction * len(paths))), set()
    for name in names[:-1]:  # never all of them
        if sum(len(groups[g]) for g in held) >= target:
            break
        held.add(name)
    return [p for p in paths if os.path.dirname(p) not in held], [p for p in paths if os.path.dirname(p) in held]


class Extender:
    """The training loop's extend-mode hook: negatives, teacher outputs, loss, validation, calibration.

    The loop calls `batch` and `loss` every step, `validate` and `score` every epoch and
    `finish` once at the end; this class never imports the loop.
    """

    def __init__(self, peft_model: nn.Module, change: Any, config: Any, pp: Any, device: torch.device,
                 train_cache: Any, val_cache: Any, base: BaseOutputs, neg_train: Any, neg_val: Any,
                 log: Callable[[str], None], rank: int = 0) -> None:
        self.model, self.change, self.config, self.pp, self.device = peft_model, change, config, pp, device
        self.n_old = change.base_num_labels
        self.new_ids = new_ids_of(change)
        self.id2label = dict(enumerate(change.labels))
        self.train_cache, self.val_cache = train_cache, val_cache
        self.neg_train, self.neg_val = neg_train, neg_val
        self.log, self.rank = log, rank
        self.teacher_pos = base.logits[:, : self.n_old]
        self.teacher_neg = None
        self.base_top1_neg_val = None
        feats, labels = base.features, train_cache.labels
        self.exemplars = load_exemplars(config.model)  # stacking: the earlier runs' added classes
        self.out = config.out
        if neg_train is not None:
            neg_base = base_outputs(peft_model, change.head_name, neg_train, pp, device, work_size=True)
            self.teacher_neg = neg_base.logits[:, : self.n_old]
            feats = torch.cat([feats, neg_base.features])
            labels = torch.cat([labels, torch.full((len(neg_train),), -1, dtype=labels.dtype)])
        if self.exemplars is not None:  # earlier classes (-2), carried negatives (-1): scored by the old rows
            feats = torch.cat([feats, self.exemplars[0]])
            labels = torch.cat([labels, exemplar_labels(self.exemplars[1]).to(labels.dtype)])
        if config.lp_steps and self.new_ids:
            self._linear_probe(feats, labels)
        if neg_val is not None:
            self.base_top1_neg_val = base_outputs(peft_model, change.head_name, neg_val, pp, device,
                                                  work_size=False).logits[:, : self.n_old].argmax(-1)

    def _linear_probe(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Fit the new rows on the frozen base's features before any LoRA step (`extend_math.linear_probe`)."""
        head = trainable_head(self.model, self.change.head_name)
        teacher = torch.cat([self.teacher_pos] + ([self.teacher_neg] if self.teacher_neg is not None else [])
                            + ([old_rows_logits(head, self.n_old, self.exemplars[0])] if self.exemplars is not None
                               else []))
        # the probe runs on the CPU tensors the caches gave (features, teacher logits); the head may be on a GPU
        row = head.weight[self.new_ids].detach().float().cpu()
        bias = head.bias[self.new_ids].detach().float().cpu() if head.bias is not None else torch.zeros(len(row))
        w, b = linear_probe(feats, labels, teacher, row, bias,
                            self.config.distill, self.config.lp_steps, self.config.lp_lr, self.config.temperature,
                            probe_row_limit(self, labels))
        with torch.no_grad():
            head.weight[self.new_ids] = w.to(head.weight)
            if head.bias is not None:
                head.bias[self.new_ids] = b.to(head.bias)

    # -- training --------------------------------------------------------------------
    def batch(self, x: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, epoch: int,
              step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append this step's negatives (label -1, the un-augmented view the teacher saw); return the teacher's old-class logits."""
        teacher = [self.teacher_pos[idx.cpu()]]
        if self.neg_train is not None:
            nidx = negative_indices(len(self.neg_train), self.config.seed, epoch, self.rank, step,
                                    len(idx))
            images, _ = self.neg_train.batch(nidx)
            xn = eval_view(images.to(x.device), self.pp, size=tuple(x.shape[-2:]))
            x = torch.cat([x, xn.to(x.dtype)])
            labels = torch.cat([labels, torch.full((len(nidx),), -1, dtype=labels.dtype, device=labels.device)])
            teacher.append(self.teacher_neg[nidx])
        return x, labels, torch.cat(teacher).to(x.device)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        c = self.config
        return extend_loss(logits, labels, teacher, self.n_old, c.distill, c.label_smoothing, c.temperature)

    # -- validation ------------------------------------------------------------------
    def _neg_logits(self) -> torch.Tensor | None:
        if self.neg_val is None:
            return None
        return cache_logits(self.model, self.neg_val, self.pp, self.device)

    def validate(self, val_logits: torch.Tensor) -> dict[str, Any]:
        """Epoch metrics: recall of new classes on held-out positives; FP rate and retention on held-out negatives."""
        rec = shift_metrics(val_logits, self.val_cache.labels, self.n_old, self.new_ids)["recall"]
        out: dict[str, Any] = {}
        if rec:
            out["new_class_recall"] = sum(rec.values()) / len(rec)
            if len(rec) > 1:
                out["new_class_recall_per_class"] = {self.id2label[c]: r for c, r in rec.items()}
        neg = self._neg_logits()
        if neg is not None:
            out.update(shift_metrics(neg, None, self.n_old, self.new_ids, self.base_top1_neg_val))
        return out

    def score(self, record: dict[str, Any]) -> float:
        """Which epoch is best: mean of recall, 1 - FP rate and retention (those measured)."""
        parts = [record.get("new_class_recall", record.get("val_accuracy", 0.0))]
        if record.get("false_positive_rate") is not None:
            parts += [1.0 - record["false_positive_rate"], record.get("retention", 1.0)]
        return float(sum(parts) / len(parts))

    # -- after training ----------------------------------------------------------------
    def finish(self, out: Path) -> dict[str, Any]:
        """Reload the best epoch, calibrate new-class biases on held-out data, print the summary.

        Returns what `vitlora.json` / `metrics.json` record under "extend". The caller saves the adapter.
        """
        reload_best(self.model, out)
        summary: dict[str, Any] = {"negatives": self.config.negatives, "distill": self.config.distill,
                                   "teacher": "cached", "target_recall": self.config.target_recall}
        if self.config.target_recall is not None and self.config.cv_folds and self.new_ids:
            from .crossfit import cross_fit, summary_lines

            crossed = cross_fit(self)
            if crossed is not None:
                summary.update(crossed)
                for line in summary_lines(summary, ", ".join(self.id2label[c] for c in self.new_ids)):
                    self.log(line)
                self._warn_no_negatives(summary)
                return summary
            self.log("warning: fewer photos of a new class than 2 folds need: threshold calibrated on the "
                     "held-out photos only")
        if self.val_cache is None or not len(self.val_cache):
            summary["calibration"] = None
            self.log("warning: no held-out positives (--val-split 0 and no --val): the new classes' bias "
                     "could not be calibrated and their recall could not be measured")
            self._warn_no_negatives(summary)
            return summary
        val_logits = cache_logits(self.model, self.val_cache, self.pp, self.device)
        neg_logits = self._neg_logits()
        if self.config.target_recall is not None:
            summary["calibration"], shift = self._calibrate(val_logits, neg_logits)
            val_logits = val_logits + shift
            neg_logits = neg_logits + shift if neg_logits is not None else None
        held = shift_metrics(val_logits, self.val_cache.labels, self.n_old, self.new_ids)["recall"]
        summary["held_out"] = {
            "n_positives": int(sum(int((self.val_cache.labels == c).sum()) for c in self.new_ids)),
            "new_class_recall": {**{self.id2label[c]: r for c, r in held.items()},
                                 "mean": sum(held.values()) / len(held) if held else None},
        }
        if neg_logits is not None:
            summary["held_out"].update(n_negatives=len(self.neg_val),
                                       **shift_metrics(neg_logits, None, self.n_old, self.new_ids,
                                                       self.base_top1_neg_val))
        self._print_summary(summary)
        return summary

    def _calibrate(self, val_logits: torch.Tensor,
                   neg_logits: torch.Tensor | None) -> tuple[dict[str, Any], torch.Tensor]:
        """Shift each new class's bias to the target recall on held-out positives; (summary, logit shift)."""
        margins = new_class_margins(val_logits, self.n_old)
        labels = self.val_cache.labels
        pos = [margins[labels == c, j] for j, c in enumerate(self.new_ids)]
        negm = new_class_margins(neg_logits, self.n_old) if neg_logits is not None else None
        cal = calibrate_thresholds(pos, negm, self.config.target_recall)
        head = trainable_head(self.model, self.change.head_name)
        with torch.no_grad():
            for c, entry in zip(self.new_ids, cal):
                entry["bias_shift"] = -entry["threshold"]
                head.bias[c] -= entry["threshold"]
                entry["bias"] = float(head.bias[c])
        shift = torch.zeros(val_logits.shape[1])
        shift[self.new_ids] = torch.tensor([-e["threshold"] for e in cal])
        return {self.id2label[c]: e for c, e in zip(self.new_ids, cal)}, shift

    def _print_summary(self, s: dict[str, Any]) -> None:
        h = s["held_out"]
        names = ", ".join(self.id2label[c] for c in self.new_ids)
        rec = h["new_class_recall"]
        per = ", ".join(f"{k} {v:.3f}" for k, v in rec.items() if k != "mean")
        cal = s.get("calibration")
        lines = [f"extend-mode summary for {names} (held-out validation data):"]
        if rec["mean"] is not None:
            lines.append(f"  new-class recall:    {rec['mean']:.3f} on {h['n_positives']} held-out photos ({per})"
                         + (" - these photos also set the threshold, so check fresh ones with vitlora eval"
                            if cal else ""))
        if "false_positive_rate" in h:
            lines.append(f"  false-positive rate: {h['false_positive_rate']:.3f} on {h['n_negatives']} held-out "
                         "negatives (share predicted as a new class)")
            lines.append(f"  retention:           {h['retention']:.3f} (share of those negatives whose top-1 is "
                         "still the base model's)")
        if cal:
            for label, e in cal.items():
                if not e.get("calibrated"):
                    lines.append(f"  {label}: no held-out photos, bias not calibrated")
                    continue
                text = (f"  threshold {label}: bias shifted by {e['bias_shift']:+.3f} so that {label} wins when its "
                        f"logit beats the best old class by > {e['threshold']:.2f} (recall {s['target_recall']:.2f} "
                        f"on {e['n_pos']} held-out photos)")
                if "neg_max" in e:
                    text += (f"; highest held-out negative {e['neg_max']:.2f}"
                             + (f": {e['held_out_fp']:.1%} of held-out negatives are still called {label} at the "
                                "recall target (add more negatives like them)" if e["conflict"] else ""))
                lines.append(text)
        for line in lines:
            self.log(line)
        self._warn_no_negatives(s)

    def _warn_no_negatives(self, s: dict[str, Any]) -> None:
        if self.neg_train is not None:
            if self.neg_val is None:
                self.log("warning: no negatives were held out (--val-split 0), so the false-positive rate was "
                         "not measured; check with vitlora eval RUN DATA --negatives DIR")
            return
        names = ", ".join(f'"{self.id2label[c]}"' for c in self.new_ids)
        carried = int((self.exemplars[1] == -1).sum()) if self.exemplars is not None else 0
        if carried:
            self.log(f"note: trained without --negatives; the {carried} negatives carried from {self.config.model} "
                     f"showed the model where {names} ends (the false-positive rate above is on them). For photos "
                     "of other things like this task's, add --negatives DIR.")
            return
        self.log(f"warning: trained without --negatives: nothing showed the model where {names} ends, and its "
                 "false-positive rate could not be measured (no photos of other things were held out; held-out "
                 "positives say nothing about it). Add --negatives DIR (photos of other things; "
                 "`python -m vitlora.negatives DIR` makes a starter set) and check a run with "
                 "`vitlora eval RUN DATA --negatives DIR`.")


def prepare_extend(peft_model: nn.Module, change: Any, config: Any, train_cache: Any, val_cache: Any,
                   base: BaseOutputs, pp: Any, device: torch.device, log: Callable[[str], None],
                   progress: bool = False, rank: int = 0) -> Extender:
    """Everything extend mode needs before the first step: frozen old rows, negatives, teacher outputs."""
    head = trainable_head(peft_model, change.head_name)
    freeze_rows(head.weight, change.base_num_labels)
    if head.bias is not None:
        freeze_rows(head.bias, change.base_num_labels)
    neg_train, neg_val = load_negatives(config, pp, log, progress)
    return Extender(peft_model, change, config, pp, device, train_cache, val_cache, base, neg_train, neg_val,
                    log, rank)


def load_negatives(config: Any, pp: Any, log: Callable[[str], None], progress: bool = False) -> tuple[Any, Any]:
    """(training, held-out) caches of `--negatives` (None, None without), split by `split_negatives`."""
    from .data import Sample, build_cache, expand_image_paths

    if not config.negatives:
        return None, None
    train_paths, val_paths = split_negatives(expand_image_paths([config.negatives]), config.val_split, config.seed)
    neg_train, rep = build_cache([Sample(p, None) for p in train_paths], None, pp, train=True,
                                 strict=config.strict, progress=progress)
    if rep.count:
        log("warning: negatives: " + rep.summary())
    neg_val = None
    if val_paths:
        neg_val, rep = build_cache([Sample(p, None) for p in val_paths], None, pp, train=False,
                                   strict=config.strict, progress=progress)
        if rep.count:
            log("warning: negatives: " + rep.summary())
    log(f"negatives: {len(neg_train)} for training, {len(neg_val) if neg_val is not None else 0} held out, "
        f"from {config.negatives}")
    return neg_train, neg_val
