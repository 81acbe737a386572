"""Extend mode's objective and calibration as pure tensor functions (unit-tested on their own).

The why of each piece is in `vitlora.extend`'s docstring: imprinting (`imprint_rows`),
distillation on the old classes (`distill_kl`, `extend_loss`), rejecting negatives
(`reject_new`), the linear probe before fine-tuning (`linear_probe`), bias calibration
(`new_class_margins`, `positive_threshold`, `calibrate_thresholds`) and the extend metrics
(`shift_metrics`). Nothing here knows about models, caches or the training loop.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .errors import VitloraError


def imprint_rows(features: torch.Tensor, labels: torch.Tensor, class_ids: list[int], norm: float) -> torch.Tensor:
    """One head row per class in `class_ids`: the mean of its L2-normalised features, normalised, times `norm`."""
    rows = []
    for c in class_ids:
        f = features[labels[:, c] > 0 if labels.ndim == 2 else labels == c]  # 2-D: multi-hot (multi-label)
        if len(f) == 0:
            raise VitloraError(f"cannot imprint class id {c}: no training images")
        rows.append(F.normalize(F.normalize(f.float(), dim=-1).mean(0), dim=0) * norm)
    return torch.stack(rows)


def distill_kl(student_old: torch.Tensor, teacher_old: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
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
                distill: float, label_smoothing: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
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
        kl = distill_kl(logits[:, :n_old], teacher_old, temperature)
        if pos.any():
            total = total + distill * kl[pos].mean()
        if neg.any():
            total = total + distill * kl[neg].mean()
    return total


def linear_probe(features: torch.Tensor, labels: torch.Tensor, teacher_old: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor, distill: float, steps: int, lr: float,
                 temperature: float = 1.0, max_norm: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train only the new rows (+ biases) on the frozen base's features with the extend loss.

    Old-class logits are the base's own (`teacher_old`: the old rows are frozen and the
    features are the base's), so this is the extend objective with LoRA off: full batch,
    Adam, deterministic, milliseconds. Fine-tuning then starts from a head that already
    fits, so LoRA gets small gradients and moves the shared features less (linear probing
    then fine-tuning, Kumar et al. 2022).

    `max_norm`: after every step each row is scaled back to at most this L2 norm (projected
    gradient; the bias stays free). Unbounded, the rows grew to ~9x the old rows' norm: the new
    logit then dwarfs every old one on any photo with a little of the class's look, and 3.6 % of
    labelled ImageNet photos (cassette players, wall clocks) were answered with the new class.
    """
    w = weight.detach().clone().float().requires_grad_(True)
    b = bias.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    f = features.float()
    for _ in range(steps):
        logits = torch.cat([teacher_old, f @ w.T + b], dim=1)
        loss = extend_loss(logits, labels, teacher_old, teacher_old.shape[1], distill, temperature=temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if max_norm:
            with torch.no_grad():
                w.mul_((max_norm / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))
    return w.detach(), b.detach()


def new_class_margins(logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """[N, n_new]: each new class's logit minus the best old-class logit (> 0: it beats every old class)."""
    return logits[:, n_old:].float() - logits[:, :n_old].float().max(dim=-1, keepdim=True).values


def _z(p: float) -> float:
    """Standard normal quantile: P(N(0,1) <= z) = p."""
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.sqrt(2) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()


def positive_threshold(margins: torch.Tensor, target_recall: float, conformal: bool = False) -> float:
    """A margin threshold t such that about `target_recall` of positives have margin > t.

    The lower of the empirical quantile and the normal fit mean - z*sd: on ten held-out
    photos the empirical quantile is just the weakest photo, and the normal fit is less
    noisy when they are alike. `conformal`: the empirical rank is the split-conformal one,
    ceil((n+1) * target) of n. (A normal *tolerance* bound, recall >= target with 90 %
    confidence, was measured and rejected: positives' margins have a heavy low tail - a few
    hard photos - so it put the threshold far below every positive and let in 5-13 % of
    unseen negatives on one of three seeds, without raising recall.)
    """
    m = margins.double().sort(descending=True).values
    n = len(m)
    if n == 0:
        raise ValueError("no positive margins")
    # conformal (split-conformal finite-sample rule): the ceil((n+1) * target)-th highest margin, so that a new
    # exchangeable positive beats it with probability >= target
    k = min(n, max(1, math.ceil(target_recall * (n + 1 if conformal else n) - 1e-9)))
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


# ---- out-of-fold calibration (k-fold cross-fitting over all photos) --------------------------


def fold_ids(n: int, k: int, seed: int) -> torch.Tensor:
    """Fold of each of n items: a seeded permutation dealt round-robin into k folds (sizes differ by <= 1)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    folds = torch.empty(n, dtype=torch.long)
    folds[perm] = torch.arange(n) % k
    return folds


def out_of_fold_new_logits(features: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor, folds: torch.Tensor,
                           weight: torch.Tensor, bias: torch.Tensor, distill: float, steps: int, lr: float,
                           temperature: float = 1.0, max_norm: float | None = None) -> torch.Tensor:
    """[N, n_new] new-class logits, each row from new rows probed (`linear_probe`) on the other folds only."""
    out = torch.empty(len(features), weight.shape[0])
    for f in folds.unique().tolist():
        keep = folds != f
        w, b = linear_probe(features[keep], labels[keep], old_logits[keep], weight, bias, distill, steps, lr,
                            temperature, max_norm)
        out[~keep] = features[~keep].float() @ w.T + b
    return out


def new_class_shift(margins: torch.Tensor, labels: torch.Tensor, new_ids: list[int], target: float) -> torch.Tensor:
    """[n_new] margin thresholds: the conformal target-recall threshold of each class's positives (0 if none),
    raised where needed so that stored exemplars of earlier added classes (label -2) keep their answer.

    Stacking fine-grained classes (cat breeds) with positives only, a new breed's photos barely beat
    the earlier breeds, so the recall target alone put its threshold below zero: the newest class
    then won wherever it came close, taking 40 % of earlier classes' exemplars and half of the
    labelled ImageNet photos. The exemplars set a floor: at most (1 - target) of them may go to the
    new class; new-class recall pays for it and the out-of-fold summary shows by how much.
    """
    out = []
    earlier = labels == -2
    for j, c in enumerate(new_ids):
        t = positive_threshold(margins[labels == c, j], target, conformal=True) if bool((labels == c).any()) else 0.0
        if bool(earlier.any()):
            m = margins[earlier, j].double().sort(descending=True).values
            allowed = int(math.floor((1.0 - target) * len(m)))  # exemplars the new class may take
            if allowed < len(m):
                t = max(t, float(m[allowed]))
        out.append(t)
    return torch.tensor(out)


def cross_fitted_metrics(old_logits: torch.Tensor, new_logits: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor,
                         new_ids: list[int], target: float, base_top1: torch.Tensor | None) -> dict[str, Any]:
    """Recall per new class, FP rate and retention where no photo is scored with a threshold it helped choose.

    `new_logits` are out-of-fold already; for each fold the threshold comes from the other folds'
    margins (`new_class_shift`), so the estimate covers the choice of threshold too.
    `labels` -1 are negatives, -2 stored exemplars of classes an earlier run added (`base_top1`:
    for every row with label < 0 in order, the answer to keep: the base's top-1 / the earlier class).
    """
    n_old = old_logits.shape[1]
    margins = new_logits - old_logits.max(dim=-1, keepdim=True).values
    pred = torch.empty(len(labels), dtype=torch.long)
    for f in folds.unique().tolist():
        inside = folds == f
        t = new_class_shift(margins[~inside], labels[~inside], new_ids, target)
        pred[inside] = torch.cat([old_logits[inside], new_logits[inside] - t], dim=1).argmax(-1)
    out: dict[str, Any] = {"new_class_recall": {c: float((pred[labels == c] == c).float().mean())
                                                for c in new_ids if bool((labels == c).any())}}
    neg = labels == -1
    if neg.any():
        out["false_positive_rate"] = float((pred[neg] >= n_old).float().mean())
    if base_top1 is not None:
        kept = pred[labels < 0] == base_top1
        for key, code in (("retention", -1), ("earlier_classes_kept", -2)):
            rows = labels[labels < 0] == code
            if rows.any():
                out[key] = float(kept[rows].float().mean())
    return out
