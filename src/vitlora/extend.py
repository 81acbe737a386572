"""Extend mode: add classes to a classifier without breaking what it already knew.

Trained on photos of the new class only with plain cross-entropy (the DeiT-tiny lab's
recipe), a model learns "everything is a raccoon": nothing in the loss says where the new
class ends, and nothing keeps the old classes' behaviour. What the training loop does in
extend mode instead (each piece is a small function here, the loop calls `prepare_extend`,
`Extender.batch`, `Extender.loss`, `Extender.validate` and `Extender.finish`):

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
  Teacher outputs are computed **once per image** on the un-augmented view (`TEACHER =
  "cached"`) rather than on every augmented crop: measured on the raccoon benchmark it gives
  the same recall / false positives / retention as on-the-fly teacher passes while training
  ~35 % faster (see the measurements in the project notes / PR).
* **Calibration** (`calibrate_thresholds`): after training, each new class's bias is shifted
  so that its held-out positives reach `--target-recall` (margin = its logit minus the best
  old logit; threshold at the lower of the empirical quantile and a normal fit). Held-out
  negatives are checked against that threshold, not used to move it; when some would still
  be called the new class the recall target wins and the summary says what it costs.
* **LoRA at a tenth of the learning rate** (`LORA_LR_SCALE`): Adam moves every LoRA weight
  by about the learning rate per step however small its gradient, and on ambiguous
  pictures (base top-1 probability ~0.3) that flips the old top-1 of 6-8 % of unseen
  negatives within one epoch at the full rate; at 0.1x none flipped (measured), while the
  new head rows still train at the full rate. The new class needs little from the
  backbone: the base's features already separate it (imprinting + a linear probe
  (`linear_probe`) on them come first).
* **Metrics** (`negative_metrics`, also each epoch on the validation split):
  `new_class_recall`, `false_positive_rate` (share of negatives predicted as any new class)
  and `retention` (share of negatives whose top-1 equals the base model's top-1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import VitloraError

TEMPERATURE = 1.0  # distillation temperature
TEACHER = "cached"  # "cached": base outputs once per image; "online": a base pass on every augmented batch
LP_STEPS, LP_LR = 100, 0.05  # linear probe of the new rows on base features before fine-tuning (0 steps: off)
LORA_LR_SCALE = 0.1  # extend mode: LoRA weights learn at this fraction of --lr (the head at the full --lr)
NEG_AUGMENT = False  # negatives: random crops (True) or the un-augmented view the cached teacher saw (False)


# ---- pure functions (unit-tested on their own) ------------------------------------------


def imprint_rows(features: torch.Tensor, labels: torch.Tensor, class_ids: list[int], norm: float) -> torch.Tensor:
    """One head row per class in `class_ids`: the mean of its L2-normalised features, normalised, times `norm`."""
    rows = []
    for c in class_ids:
        f = features[labels == c]
        if len(f) == 0:
            raise VitloraError(f"cannot imprint class id {c}: no training images")
        rows.append(F.normalize(F.normalize(f.float(), dim=-1).mean(0), dim=0) * norm)
    return torch.stack(rows)


def distill_kl(student_old: torch.Tensor, teacher_old: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Per-sample KL(teacher || student) over the old classes (each renormalised), times T^2."""
    t = temperature
    log_s = torch.log_softmax(student_old.float() / t, dim=-1)
    log_t = torch.log_softmax(teacher_old.float() / t, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * (t * t)


def reject_new(logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """Per-sample -log(1 - p_new): p_new is the softmax mass on all classes from `n_old` on."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -torch.logsumexp(log_p[:, :n_old], dim=-1)  # log(1 - p_new) = log(sum of old probs)


def extend_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_old: torch.Tensor | None, n_old: int,
                distill: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Extend-mode objective. `labels` >= 0 are positives, -1 marks a negative (unlabelled other photo).

    positives: CE(label) + distill * KL_old;  negatives: -log(1 - p_new) + distill * KL_old.
    Both halves are means over their own items, so the mix of a batch does not reweigh them.
    """
    pos, neg = labels >= 0, labels < 0
    total = logits.new_zeros(())
    if pos.any():
        total = total + F.cross_entropy(logits[pos].float(), labels[pos], label_smoothing=label_smoothing)
    if neg.any():
        total = total + reject_new(logits[neg], n_old).mean()
    if teacher_old is not None and distill > 0:
        kl = distill_kl(logits[:, :n_old], teacher_old)
        if pos.any():
            total = total + distill * kl[pos].mean()
        if neg.any():
            total = total + distill * kl[neg].mean()
    return total


def linear_probe(features: torch.Tensor, labels: torch.Tensor, teacher_old: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor, distill: float, steps: int = LP_STEPS, lr: float = LP_LR) -> tuple[torch.Tensor, torch.Tensor]:
    """Train only the new rows (+ biases) on the frozen base's features with the extend loss.

    Old-class logits are the base's own (`teacher_old`: the old rows are frozen and the
    features are the base's), so this is the extend objective with LoRA off: full batch,
    Adam, deterministic, milliseconds. Fine-tuning then starts from a head that already
    fits, so LoRA gets small gradients and moves the shared features less (linear probing
    then fine-tuning, Kumar et al. 2022).
    """
    w = weight.detach().clone().float().requires_grad_(True)
    b = bias.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    f = features.float()
    for _ in range(steps):
        logits = torch.cat([teacher_old, f @ w.T + b], dim=1)
        loss = extend_loss(logits, labels, teacher_old, teacher_old.shape[1], distill)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


def new_class_margins(logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """[N, n_new]: each new class's logit minus the best old-class logit (> 0: it beats every old class)."""
    return logits[:, n_old:].float() - logits[:, :n_old].float().max(dim=-1, keepdim=True).values


def _z(p: float) -> float:
    """Standard normal quantile: P(N(0,1) <= z) = p."""
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.sqrt(2) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()


def positive_threshold(margins: torch.Tensor, target_recall: float) -> float:
    """A margin threshold t such that about `target_recall` of positives have margin > t.

    The lower of the empirical quantile and the normal fit mean - z*sd: on ten held-out
    photos the empirical quantile is just the weakest photo, and the normal fit is less
    noisy when they are alike. (A normal *tolerance* bound, recall >= target with 90 %
    confidence, was measured and rejected: positives' margins have a heavy low tail - a few
    hard photos - so it put the threshold far below every positive and let in 5-13 % of
    unseen negatives on one of three seeds, without raising recall.)
    """
    m = margins.double().sort(descending=True).values
    n = len(m)
    if n == 0:
        raise ValueError("no positive margins")
    k = min(n, max(1, math.ceil(target_recall * n - 1e-9)))
    empirical = float(m[k - 1]) - 1e-4
    if n < 2 or target_recall >= 1.0:
        return empirical
    return min(empirical, float(m.mean()) - _z(target_recall) * float(m.std()))


def calibrate_thresholds(pos_margins: list[torch.Tensor], neg_margins: torch.Tensor | None,
                         target_recall: float) -> list[dict[str, Any]]:
    """Per new class: the margin threshold t (predict the class when margin > t; bias += -t).

    `pos_margins[j]`: margins of new class j on its held-out positives; `neg_margins`
    [M, n_new] on held-out negatives (or None). t is the positives' target-recall threshold.
    Held-out negatives do not move it (measured: negatives from other pictures than the
    held-out ones score higher, so a threshold lowered to just above the held-out negatives
    let unseen ones in) but are checked against it: `conflict` says that some of them would
    still be predicted as the class, i.e. the recall target costs false positives.
    """
    out = []
    for j, pm in enumerate(pos_margins):
        entry: dict[str, Any] = {"n_pos": len(pm)}
        if len(pm) == 0:
            entry.update(threshold=0.0, calibrated=False)
            out.append(entry)
            continue
        t = positive_threshold(pm, target_recall)
        entry.update(threshold=t, calibrated=True)
        if neg_margins is not None and len(neg_margins):
            t_neg = float(neg_margins[:, j].max())
            entry.update(neg_max=t_neg, n_neg=len(neg_margins), conflict=t_neg > t,
                         held_out_fp=float((neg_margins[:, j] > t).float().mean()))
        out.append(entry)
    return out


def shift_metrics(logits: torch.Tensor, labels: torch.Tensor | None, n_old: int, new_ids: list[int],
                  base_top1: torch.Tensor | None = None) -> dict[str, Any]:
    """Recall per new class on labelled rows, or FP rate / retention on negatives (labels None)."""
    pred = logits.argmax(dim=-1)
    if labels is None:
        is_new = pred >= n_old
        out: dict[str, Any] = {"false_positive_rate": float(is_new.float().mean()) if len(pred) else None}
        if base_top1 is not None:
            out["retention"] = float((pred == base_top1).float().mean()) if len(pred) else None
        return out
    recall = {}
    for c in new_ids:
        mask = labels == c
        if mask.any():
            recall[c] = float((pred[mask] == c).float().mean())
    return {"recall": recall}


# ---- model helpers --------------------------------------------------------------------


def trainable_head(peft_model: nn.Module, head_name: str) -> nn.Linear:
    """The head copy that trains and is saved (PEFT `modules_to_save`), or the head itself."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    module = getattr(base, head_name)
    copies = getattr(module, "modules_to_save", None)
    if copies is not None:
        name = getattr(module, "active_adapter", None) or "default"
        name = name[0] if isinstance(name, (list, tuple)) else name
        return copies[name]
    return module


def _eval_view(images: torch.Tensor, pp: Any) -> torch.Tensor:
    """Normalised eval-size view of a work-size uint8 batch (the center of what eval would crop)."""
    from .data import normalize

    x = images.float()
    s = x.shape[-1]
    if pp.resize_mode == "exact" and pp.resize_size:
        frac = pp.height / pp.resize_size[0]
    elif pp.resize_mode == "shortest_edge" and pp.shortest_edge:
        frac = min(pp.height, pp.width) / pp.shortest_edge
    else:
        frac = 1.0
    if frac < 1.0:
        keep = max(1, round(s * frac))
        top = (s - keep) // 2
        x = x[..., top : top + keep, top : top + keep]
    x = F.interpolate(x, size=(pp.height, pp.width), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x.round().clamp(0, 255), pp)


@dataclass
class BaseOutputs:
    """The frozen base's head inputs (features) and logits, one row per cached image."""

    features: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def base_outputs(peft_model: nn.Module, head_name: str, cache: Any, pp: Any, device: torch.device,
                 work_size: bool, batch_size: int = 64) -> BaseOutputs:
    """Run the frozen base (adapter disabled) over a cache, un-augmented; CPU float32 results."""
    from .data import normalize

    wrapper = getattr(peft_model.get_base_model(), head_name)
    feats: list[torch.Tensor] = []
    hook = wrapper.register_forward_hook(lambda m, args, out: feats.append(args[0].detach().float().cpu()))
    logits = []
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            for start in range(0, len(cache), batch_size):
                images, _ = cache.batch(torch.arange(start, min(start + batch_size, len(cache))))
                images = images.to(device)
                x = _eval_view(images, pp) if work_size else normalize(images, pp)
                logits.append(peft_model(pixel_values=x).logits.float().cpu())
    finally:
        hook.remove()
        peft_model.train(was_training)
    return BaseOutputs(torch.cat(feats), torch.cat(logits))


def _new_ids(change: Any) -> list[int]:
    ids = {lab: i for i, lab in enumerate(change.labels)}
    return [ids[lab] for lab in change.new_labels]


def imprint_new_rows(peft_model: nn.Module, change: Any, train_cache: Any, pp: Any, device: torch.device,
                     log: Callable[[str], None] = lambda m: None) -> BaseOutputs | None:
    """Initialise the head rows of new labels by imprinting (both modes); returns the base's outputs.

    In replace mode with every label known to the base there is nothing to imprint (None).
    """
    new_ids = _new_ids(change)
    if change.mode == "replace" and not new_ids:
        return None
    outs = base_outputs(peft_model, change.head_name, train_cache, pp, device, work_size=True)
    if new_ids and change.row_norm:
        rows = imprint_rows(outs.features, train_cache.labels, new_ids, change.row_norm)
        head = trainable_head(peft_model, change.head_name)
        with torch.no_grad():
            head.weight[new_ids] = rows.to(head.weight)
            if head.bias is not None:
                head.bias[new_ids] = change.bias_mean
        log(f"imprinted {len(new_ids)} new head row{'s' if len(new_ids) != 1 else ''} from class-mean features "
            f"(norm {change.row_norm:.3f}, bias {change.bias_mean:.3f})")
    return outs


# ---- the loop's extend-mode helper -------------------------------------------------------


def _freeze_rows(param: nn.Parameter, n_old: int) -> None:
    """Rows [:n_old] never change: zero gradient (Adam then moves them by exactly 0) and no weight decay."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:n_old] = 0
        return grad

    param.register_hook(hook)
    param.no_weight_decay = True  # read by training._optimizer: decoupled decay would shrink the frozen rows


def lora_lr_scale(config: Any, mode: str) -> float:
    """LoRA's learning rate as a fraction of --lr: --lora-lr-scale, else LORA_LR_SCALE in extend mode, else 1."""
    if config.lora_lr_scale is not None:
        return float(config.lora_lr_scale)
    return LORA_LR_SCALE if mode == "extend" else 1.0


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
    """Extend-mode state the training loop carries: negatives, teacher outputs, validation, calibration."""

    def __init__(self, peft_model: nn.Module, change: Any, config: Any, pp: Any, device: torch.device,
                 train_cache: Any, val_cache: Any, base: BaseOutputs, neg_train: Any, neg_val: Any,
                 log: Callable[[str], None], rank: int = 0) -> None:
        self.model, self.change, self.config, self.pp, self.device = peft_model, change, config, pp, device
        self.n_old = change.base_num_labels
        self.new_ids = _new_ids(change)
        self.id2label = dict(enumerate(change.labels))
        self.train_cache, self.val_cache = train_cache, val_cache
        self.neg_train, self.neg_val = neg_train, neg_val
        self.log, self.rank = log, rank
        self.teacher_pos = base.logits[:, : self.n_old]
        self.teacher_neg = None
        self.base_top1_neg_val = None
        feats, labels = base.features, train_cache.labels
        if neg_train is not None:
            neg_base = base_outputs(peft_model, change.head_name, neg_train, pp, device, work_size=True)
            self.teacher_neg = neg_base.logits[:, : self.n_old]
            feats = torch.cat([feats, neg_base.features])
            labels = torch.cat([labels, torch.full((len(neg_train),), -1, dtype=labels.dtype)])
        if LP_STEPS and self.new_ids:
            head = trainable_head(peft_model, change.head_name)
            teacher = torch.cat([self.teacher_pos] + ([self.teacher_neg] if self.teacher_neg is not None else []))
            bias = head.bias[self.new_ids] if head.bias is not None else torch.zeros(len(self.new_ids))
            w, b = linear_probe(feats, labels, teacher, head.weight[self.new_ids], bias, config.distill)
            with torch.no_grad():
                head.weight[self.new_ids] = w.to(head.weight)
                if head.bias is not None:
                    head.bias[self.new_ids] = b.to(head.bias)
        if neg_val is not None:
            self.base_top1_neg_val = base_outputs(peft_model, change.head_name, neg_val, pp, device,
                                                  work_size=False).logits[:, : self.n_old].argmax(-1)

    # -- training --------------------------------------------------------------------
    def _neg_indices(self, epoch: int, step: int, k: int) -> torch.Tensor:
        """k negatives for this step: a walk through per-epoch permutations, stateless (resume-exact)."""
        n = len(self.neg_train)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch * 7919 + self.rank * 104_729)
        start = step * k
        reps = (start + k) // n + 1
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])
        return order[start : start + k]

    @torch.no_grad()
    def _online_teacher(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.model(pixel_values=x).logits[:, : self.n_old].float()
        finally:
            self.model.train(was_training)

    def batch(self, x: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, epoch: int, step: int,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append this step's augmented negatives (label -1) and return the teacher's old-class logits."""
        from .data import random_resized_crop_flip

        teacher = [self.teacher_pos[idx.cpu()]]
        if self.neg_train is not None:
            nidx = self._neg_indices(epoch, step, len(idx))
            images, _ = self.neg_train.batch(nidx)
            if NEG_AUGMENT or TEACHER == "online":
                xn = random_resized_crop_flip(images.to(x.device), self.pp, scale=(self.config.aug_scale_min, 1.0),
                                              generator=gen)
            else:
                xn = _eval_view(images.to(x.device), self.pp)
            x = torch.cat([x, xn.to(x.dtype)])
            labels = torch.cat([labels, torch.full((len(nidx),), -1, dtype=labels.dtype, device=labels.device)])
            teacher.append(self.teacher_neg[nidx])
        if TEACHER == "online":
            return x, labels, self._online_teacher(x)
        return x, labels, torch.cat(teacher).to(x.device)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return extend_loss(logits, labels, teacher, self.n_old, self.config.distill, self.config.label_smoothing)

    # -- validation ------------------------------------------------------------------
    def _neg_logits(self) -> torch.Tensor | None:
        from .runtime import Runtime
        from .training import evaluate_cache

        if self.neg_val is None:
            return None
        return evaluate_cache(self.model, self.neg_val, self.pp, Runtime(self.device, "fp32", ""))

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
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        from .runtime import Runtime
        from .training import evaluate_cache

        set_peft_model_state_dict(self.model, load_peft_weights(str(out), device="cpu"))
        rt = Runtime(self.device, "fp32", "")
        summary: dict[str, Any] = {"negatives": self.config.negatives, "distill": self.config.distill,
                                   "teacher": TEACHER, "target_recall": self.config.target_recall}
        if self.val_cache is None or not len(self.val_cache):
            summary["calibration"] = None
            self.log("warning: no held-out positives (--val-split 0 and no --val): the new classes' bias "
                     "could not be calibrated and their recall could not be measured")
            self._warn_no_negatives(summary)
            return summary
        val_logits = evaluate_cache(self.model, self.val_cache, self.pp, rt)
        neg_logits = self._neg_logits()
        if self.config.target_recall is not None:
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
            summary["calibration"] = {self.id2label[c]: e for c, e in zip(self.new_ids, cal)}
            shift = torch.zeros(val_logits.shape[1])
            shift[self.new_ids] = torch.tensor([-e["threshold"] for e in cal])
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
        self.log(f"warning: trained without --negatives: nothing showed the model where {names} ends, and its "
                 "false-positive rate could not be measured (no photos of other things were held out; held-out "
                 "positives say nothing about it). Add --negatives DIR (photos of other things; "
                 "`python -m vitlora.negatives DIR` makes a starter set) and check a run with "
                 "`vitlora eval RUN DATA --negatives DIR`.")


def prepare_extend(peft_model: nn.Module, change: Any, config: Any, train_cache: Any, val_cache: Any,
                   base: BaseOutputs, pp: Any, device: torch.device, log: Callable[[str], None],
                   progress: bool = False, rank: int = 0) -> Extender:
    """Everything extend mode needs before the first step: frozen old rows, negatives, teacher outputs."""
    from .data import build_cache, expand_image_paths

    head = trainable_head(peft_model, change.head_name)
    _freeze_rows(head.weight, change.base_num_labels)
    if head.bias is not None:
        _freeze_rows(head.bias, change.base_num_labels)
    neg_train = neg_val = None
    if config.negatives:
        paths = expand_image_paths([config.negatives])
        train_paths, val_paths = split_negatives(paths, config.val_split, config.seed)
        from .data import Sample

        neg_train, rep = build_cache([Sample(p, None) for p in train_paths], None, pp, train=True,
                                     strict=config.strict, progress=progress)
        if rep.count:
            log("warning: negatives: " + rep.summary())
        if val_paths:
            neg_val, rep = build_cache([Sample(p, None) for p in val_paths], None, pp, train=False,
                                       strict=config.strict, progress=progress)
            if rep.count:
                log("warning: negatives: " + rep.summary())
        log(f"negatives: {len(neg_train)} for training, {len(neg_val) if neg_val is not None else 0} held out, "
            f"from {config.negatives}")
    ext = Extender(peft_model, change, config, pp, device, train_cache, val_cache, base, neg_train, neg_val,
                   log, rank)
    return ext


# ---- `vitlora eval --negatives` -----------------------------------------------------------


def negative_metrics(run: Any, data: str, negatives_dir: str, label: str | None = None,
                     base: nn.Module | None = None, batch_size: int = 64) -> dict[str, Any]:
    """new_class_recall (per new class and mean) on DATA, false_positive_rate and retention on the negatives.

    `retention` compares with the run's base model without this run's adapter (for a run
    stacked on another run: that run, merged), loaded from `vitlora.json` unless `base` is given.
    """
    from .data import Sample, build_cache, discover, expand_image_paths, normalize
    from .evaluation import data_label_ids
    from .modeling import load_base

    if run.labels_info.get("mode", run.settings.get("mode")) != "extend":
        raise VitloraError("--negatives is for runs trained in extend mode (the base's classes kept)")
    n_old = int(run.labels_info["base_num_labels"])
    label2id = {lab: i for i, lab in run.id2label.items()}
    new_ids = [label2id[lab] for lab in run.new_labels]

    def logits_of(model_fn: Callable[[torch.Tensor], torch.Tensor], cache: Any) -> torch.Tensor:
        outs = []
        for start in range(0, len(cache), batch_size):
            images, _ = cache.batch(torch.arange(start, min(start + batch_size, len(cache))))
            outs.append(model_fn(normalize(images, run.preprocess)).float().cpu())
        return torch.cat(outs)

    source = discover(data, label=label)
    ids = data_label_ids(run, source.labels)
    pos_samples = [s for s in source.samples if ids[s.label] in new_ids]
    recall: dict[str, Any] = {}
    if pos_samples:
        cache, _ = build_cache(pos_samples, ids, run.preprocess, train=False)
        rec = shift_metrics(logits_of(run.logits, cache), cache.labels, n_old, new_ids)["recall"]
        recall = {run.id2label[c]: r for c, r in rec.items()}
        recall["mean"] = sum(rec.values()) / len(rec)

    paths = expand_image_paths([negatives_dir])
    neg_cache, report = build_cache([Sample(p, None) for p in paths], None, run.preprocess, train=False)
    neg_logits = logits_of(run.logits, neg_cache)
    if base is None:
        base, _ = load_base(run.settings["base_model"], "cpu")
    base = base.to(run.device).eval()
    with torch.inference_mode():
        base_logits = logits_of(lambda x: base(pixel_values=x.to(run.device)).logits, neg_cache)
    base_top1 = base_logits[:, :n_old].argmax(-1)
    m = shift_metrics(neg_logits, None, n_old, new_ids, base_top1)
    pred = neg_logits.argmax(-1)
    return {
        "new_class_recall": recall or None,
        "false_positive_rate": m["false_positive_rate"],
        "retention": m["retention"],
        "n_negatives": len(neg_cache),
        "negatives_skipped": report.count,
        "false_positives_by_class": {run.id2label[c]: int((pred == c).sum()) for c in new_ids},
        "negatives": negatives_dir,
    }
