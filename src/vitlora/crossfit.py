"""Extend mode's threshold and summary from ALL training photos, out of fold (k-fold cross-fitting).

Calibrating the new classes' bias on the ~10 % held-out photos and reporting recall on those
same photos says "recall 1.000" by construction. Instead, after training (best epoch loaded):

1. every photo - training and held-out positives, training and held-out negatives - goes
   through the trained model once (un-augmented): head inputs and old-class logits;
2. the photos are dealt into `--cv-folds` folds; for each fold the new head rows are refitted
   by the linear probe (`extend_math.linear_probe`, from the trained rows) on the other folds'
   features, and the fold's new-class logits come from those rows (out of fold);
3. the threshold is the split-conformal target-recall quantile of the pooled out-of-fold
   margins (the lower of it and the normal fit: `positive_threshold(conformal=True)`); the
   final rows are the probe fitted on all photos, their bias shifted by that threshold;
4. the summary's recall / false-positive rate / retention are cross-fitted: each fold is
   scored with a threshold chosen on the other folds (`cross_fitted_metrics`).

Stacking (`--model RUN_DIR`): each run stores up to `EXEMPLARS_PER_CLASS` head-input features
of every class it added, plus those it inherited, in `exemplars.safetensors`. A later run
loads them (`load_exemplars`) and treats them as negatives of its own new classes (label -2)
in the linear probe, the out-of-fold refits and the final rows; the summary reports
`earlier_classes_kept`, the out-of-fold share of them still answered with their own class.
Their features were taken under the earlier run, i.e. the later run's starting point (its
LoRA moves them a little).

Caveat, said in the summary: LoRA itself saw every training photo, so the features are a
little kinder to these photos than to fresh ones; the estimate is honest about the head and
the threshold, not about the backbone.
"""

from __future__ import annotations

from typing import Any

import torch

from .extend_math import (
    cross_fitted_metrics,
    fold_ids,
    linear_probe,
    new_class_shift,
    out_of_fold_new_logits,
)
from .heads import base_outputs, trainable_head


EXEMPLARS = "exemplars.safetensors"
EXEMPLARS_PER_CLASS = 64
NEGATIVES_KEPT = 128  # features of the run's own --negatives carried forward (class id -1), besides inherited ones


def load_exemplars(model: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features, class ids) an earlier extend run stored, if `model` is such a run: its added classes' exemplars
    (their ids) and features of the photos of other things it was given as --negatives (id -1)."""
    from pathlib import Path

    path = Path(model) / EXEMPLARS
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    d = load_file(str(path))
    return d["features"].float(), d["labels"].long()


def exemplar_labels(ids: torch.Tensor) -> torch.Tensor:
    """Probe labels of stored rows: -2 for an earlier added class's exemplar, -1 for a carried negative."""
    return torch.where(ids >= 0, torch.full_like(ids, -2), torch.full_like(ids, -1)).long()


def save_exemplars(out: Any, feats: torch.Tensor, labels: torch.Tensor, new_ids: list[int],
                   inherited: tuple[torch.Tensor, torch.Tensor] | None, seed: int) -> int:
    """Store up to EXEMPLARS_PER_CLASS features per new class and NEGATIVES_KEPT of the run's negatives (seeded
    picks) plus the inherited ones; rows written.

    The negatives travel so that a later step with positives only still sees photos of other things:
    stacking cat breeds, a breed whose only negatives were the earlier breeds' exemplars learnt "a cat
    that is not the earlier breed" and answered 66 of 500 ImageNet photos with its name."""
    from pathlib import Path

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    keep_f, keep_y = ([inherited[0]], [inherited[1]]) if inherited is not None else ([], [])
    if inherited is not None:  # they come last in `feats` (`_gather`) and are kept above, once
        feats, labels = feats[: len(labels) - len(inherited[1])], labels[: len(labels) - len(inherited[1])]
    for cid, n in [(c, EXEMPLARS_PER_CLASS) for c in new_ids] + [(-1, NEGATIVES_KEPT)]:
        rows = (labels == cid).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)[:n]]
        keep_f.append(feats[rows])
        keep_y.append(torch.full((len(rows),), cid, dtype=torch.long))
    f, y = torch.cat(keep_f).float().contiguous(), torch.cat(keep_y).contiguous()
    save_file({"features": f, "labels": y}, str(Path(out) / EXEMPLARS))
    return len(y)


ROW_NORM_CAP = 1.5  # --row-norm-cap's default where the probe has negatives (benchmarks/sweep.py, 5 folds)


def row_norm_limit(change: Any, config: Any, negatives: bool, several_new: bool = False) -> float | None:
    """The new rows' largest L2 norm: `--row-norm-cap` times the median norm of the base's rows (None: no cap).

    Default: capped where the probe sees `--negatives` (photos of other things); measured on 5
    raccoon folds, recall 0.91 -> 0.97 and ImageNet photos taken by the new class 3.4 % -> 0.4 %.
    Also capped when a first extension adds `several_new` classes (not stacked) with positives
    only: four cat breeds at once (`benchmarks/extend_several.py`, 2 seeds) took 13 % of ImageNet
    photos uncapped and 2.5 % capped (top-1 0.705 -> 0.780) at equal mean recall (0.622 vs 0.617).
    Otherwise the cap only lets the bias grow instead, so it stays off: one class with positives
    only, false positives 0.04 -> 0.08; stacking breeds whose only negatives are earlier classes'
    exemplars, the thresholds went below zero and 11 % of ImageNet photos were taken by the last breed.
    """
    capped = negatives or several_new
    cap = config.row_norm_cap if config.row_norm_cap is not None else (ROW_NORM_CAP if capped else 0.0)
    norm = getattr(change, "row_norm", None)
    return cap * float(norm) if cap and norm else None


def probe_row_limit(ext: Any, labels: torch.Tensor) -> float | None:
    """`row_norm_limit` for the probe of extend run `ext` on photos with these `labels` (-1: negatives)."""
    return row_norm_limit(ext.change, ext.config, negatives=bool((labels == -1).any()),
                          several_new=len(ext.new_ids) > 1 and ext.exemplars is None)


def old_rows_logits(head: Any, n_old: int, feats: torch.Tensor) -> torch.Tensor:
    """Old-class logits of head inputs under the (frozen) old rows."""
    w, b = head.weight[:n_old].detach().float().cpu(), head.bias[:n_old].detach().float().cpu()
    return feats @ w.T + b


def _gather(ext: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(features, old-class logits, labels: -1 negatives / -2 earlier classes' exemplars, the answer to keep for
    each of those) of every photo."""
    parts = [(ext.train_cache, True, ext.train_cache.labels)]
    if ext.val_cache is not None and len(ext.val_cache):
        parts.append((ext.val_cache, False, ext.val_cache.labels))
    base_top1 = []
    if ext.neg_train is not None:
        parts.append((ext.neg_train, True, torch.full((len(ext.neg_train),), -1)))
        base_top1.append(ext.teacher_neg.argmax(-1))
    if ext.neg_val is not None:
        parts.append((ext.neg_val, False, torch.full((len(ext.neg_val),), -1)))
        base_top1.append(ext.base_top1_neg_val.cpu())
    feats, old, labels = [], [], []
    for cache, work_size, y in parts:
        out = base_outputs(ext.model, ext.change.head_name, cache, ext.pp, ext.device, work_size, adapter=True)
        feats.append(out.features)
        old.append(out.logits[:, : ext.n_old])
        labels.append(y.long())
    if ext.exemplars is not None:
        f, y = ext.exemplars
        feats.append(f)
        old_f = old_rows_logits(trainable_head(ext.model, ext.change.head_name), ext.n_old, f)
        old.append(old_f)
        labels.append(exemplar_labels(y))
        base_top1.append(torch.where(y >= 0, y, old_f.argmax(-1)))  # carried negatives keep the old top-1
    return torch.cat(feats), torch.cat(old), torch.cat(labels), torch.cat(base_top1) if base_top1 else None


def cross_fit(ext: Any) -> dict[str, Any] | None:
    """Refit the new rows on all photos, shift their bias by the out-of-fold threshold; the summary entries.

    None when some new class has fewer photos than 2 folds need (the caller falls back to the
    held-out calibration).
    """
    c = ext.config
    feats, old, labels, base_top1 = _gather(ext)
    n_per_class = [int((labels == cid).sum()) for cid in ext.new_ids]
    k = min([c.cv_folds] + n_per_class)
    if k < 2:
        return None
    head = trainable_head(ext.model, ext.change.head_name)
    w0 = head.weight[ext.new_ids].detach().float().cpu()
    b0 = head.bias[ext.new_ids].detach().float().cpu() if head.bias is not None else torch.zeros(len(ext.new_ids))
    probe = (c.distill, c.lp_steps or 100, c.lp_lr, c.temperature, probe_row_limit(ext, labels))
    folds = fold_ids(len(labels), k, c.seed)
    new_oof = out_of_fold_new_logits(feats, labels, old, folds, w0, b0, *probe)
    metrics = cross_fitted_metrics(old, new_oof, labels, folds, ext.new_ids, c.target_recall, base_top1)
    margins = new_oof - old.max(dim=-1, keepdim=True).values
    t = new_class_shift(margins, labels, ext.new_ids, c.target_recall)
    w, b = linear_probe(feats, labels, old, w0, b0, *probe)
    calibration = {}
    with torch.no_grad():
        head.weight[ext.new_ids] = w.to(head.weight)
        for j, cid in enumerate(ext.new_ids):
            head.bias[cid] = float(b[j]) - float(t[j])
            calibration[ext.id2label[cid]] = {
                "threshold": float(t[j]), "bias_shift": -float(t[j]), "bias": float(head.bias[cid]),
                "n_pos": n_per_class[j], "calibrated": True, "method": f"out-of-fold conformal, {k} folds"}
    temperature = _fold_temperature(head, old, new_oof - t, labels, ext.n_old, c)
    rec = metrics["new_class_recall"]
    oof: dict[str, Any] = {"folds": k, "n_positives": sum(n_per_class), "n_negatives": int((labels < 0).sum()),
                           "new_class_recall": {**{ext.id2label[cid]: r for cid, r in rec.items()},
                                                "mean": sum(rec.values()) / len(rec)}}
    oof.update({key: metrics[key] for key in ("false_positive_rate", "retention", "earlier_classes_kept")
                if key in metrics})
    oof["n_negatives"] = int((labels == -1).sum())
    oof["n_exemplars"] = int((labels == -2).sum())
    oof["n_carried_negatives"] = int((ext.exemplars[1] == -1).sum()) if ext.exemplars is not None else 0
    oof["exemplars_saved"] = save_exemplars(ext.out, feats, labels, ext.new_ids, ext.exemplars, c.seed)
    return {"calibration": calibration, "out_of_fold": oof} | ({"temperature": temperature} if temperature else {})


def _fold_temperature(head: Any, old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, n_old: int,
                      config: Any) -> dict[str, Any] | None:
    """With negatives: fit T on the out-of-fold logits (`fit_extend_temperature`) and divide the whole head by
    it (every answer unchanged; every consumer of the head sees the same probabilities). None: not fitted."""
    if config.no_calibrate or not bool((labels == -1).any()):
        return None
    from .calibration import fit_extend_temperature, fold_temperature

    scored = (labels >= 0) | (labels == -1)
    logits = torch.cat([old, new], dim=1)
    t = fit_extend_temperature(logits[scored], labels[scored], n_old)
    fold_temperature(head, t)
    return {"value": t, "n_images": int(scored.sum()), "method": "out-of-fold logits (positives and negatives)"}


def summary_lines(s: dict[str, Any], names: str) -> list[str]:
    """The printed summary of a cross-fitted run: every number with its data and sample size."""
    o = s["out_of_fold"]
    rec = o["new_class_recall"]
    per = ", ".join(f"{k} {v:.3f}" for k, v in rec.items() if k != "mean")
    lines = [f"extend-mode summary for {names}, out of fold ({o['folds']} folds over all {o['n_positives']} photos"
             f" of the new class{'es' if len(rec) > 2 else ''} and {o['n_negatives']} negatives"
             + (f" ({o['n_carried_negatives']} carried from the run stacked on)" if o.get("n_carried_negatives")
                else "") + "; each fold scored "
             "with head rows and threshold fitted on the other folds; LoRA saw them all, so expect a little less on "
             "fresh photos - check with vitlora eval):",
             f"  new-class recall:    {rec['mean']:.3f} on {o['n_positives']} photos ({per})"]
    if "false_positive_rate" in o:
        lines.append(f"  false-positive rate: {o['false_positive_rate']:.3f} on {o['n_negatives']} negatives "
                     "(share predicted as a new class)")
    if "retention" in o:
        lines.append(f"  retention:           {o['retention']:.3f} on the same {o['n_negatives']} negatives "
                     "(share whose top-1 is still the base model's)")
    if "earlier_classes_kept" in o:
        lines.append(f"  earlier classes kept: {o['earlier_classes_kept']:.3f} of {o['n_exemplars']} stored exemplars "
                     "of the classes earlier runs added (still answered with their own class)")
    for label, e in s["calibration"].items():
        lines.append(f"  threshold {label}: bias shifted by {e['bias_shift']:+.3f} so that {label} wins when its "
                     f"logit beats the best old class by > {e['threshold']:.2f} (conformal recall "
                     f"{s['target_recall']:.2f} on {e['n_pos']} out-of-fold margins)")
    if s.get("temperature"):
        tmp = s["temperature"]
        lines.append(f"  temperature {tmp['value']:.3f} fitted on the {tmp['n_images']} out-of-fold photos, then the "
                     "whole head divided by it: probabilities are softmax(logits / T) (the threshold above is in "
                     "logits before it), every answer unchanged")
    return lines
