"""Classification metrics from logits, written out so every number can be checked by hand.

Conventions (documented in the README):
- per-class precision/recall/F1 and their macro means are over the labels that occur in
  the evaluated data (support > 0); a class the model predicts but the data lacks still
  lowers the precision of the true classes, because those predictions are wrong;
- precision of a class never predicted is 0, as is F1 when precision + recall is 0;
- `nll` is the mean negative log-likelihood of the true class under softmax;
- the confusion matrix covers the labels that occur in the data or in the predictions,
  rows = true label, columns = predicted label, in the order given by `labels`.
"""

from __future__ import annotations

from typing import Any

import torch


def classification_report(
    logits: torch.Tensor, targets: torch.Tensor, id2label: dict[int, str], top_k: int = 5
) -> dict[str, Any]:
    """All metrics for one evaluation. `logits` [N, C] float, `targets` [N] int class ids."""
    logits = logits.float()
    n = int(targets.numel())
    if n == 0:
        return {"n_images": 0}
    log_probs = torch.log_softmax(logits, dim=-1)
    preds = logits.argmax(dim=-1)
    k = min(top_k, logits.shape[-1])
    topk = logits.topk(k, dim=-1).indices
    present = sorted(set(targets.tolist()))
    cm_ids = sorted(set(present) | set(preds.tolist()))
    pos = {c: i for i, c in enumerate(cm_ids)}
    cm = torch.zeros(len(cm_ids), len(cm_ids), dtype=torch.long)
    for t, p in zip(targets.tolist(), preds.tolist()):
        cm[pos[t], pos[p]] += 1

    per_class: dict[str, dict[str, float]] = {}
    for c in present:
        tp = int(((preds == c) & (targets == c)).sum())
        predicted = int((preds == c).sum())
        support = int((targets == c).sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[id2label[c]] = {"precision": precision, "recall": recall, "f1": f1, "support": support}

    def macro(key: str) -> float:
        return sum(v[key] for v in per_class.values()) / len(per_class)

    return {
        "n_images": n,
        "accuracy": float((preds == targets).float().mean()),
        "top5_accuracy": float((topk == targets[:, None]).any(dim=1).float().mean()),
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),
        "macro_f1": macro("f1"),
        "nll": float(-log_probs[torch.arange(n), targets].mean()),
        "per_class": per_class,
        "confusion_matrix": {"labels": [id2label[c] for c in cm_ids], "matrix": cm.tolist()},
    }


def top_k_predictions(probs: torch.Tensor, id2label: dict[int, str], k: int) -> list[list[tuple[str, float]]]:
    """[(label, probability)] best first, for each row of `probs`."""
    k = min(k, probs.shape[-1])
    values, indices = probs.float().topk(k, dim=-1)
    return [
        [(id2label[int(i)], float(v)) for v, i in zip(vrow, irow)]
        for vrow, irow in zip(values.tolist(), indices.tolist())
    ]
