"""Classification metrics from logits, written out so every number can be checked by hand.

Conventions (documented in the README):
- per-class precision/recall/F1 and their macro means are over the labels that occur in
  the evaluated data (support > 0); a class the model predicts but the data lacks still
  lowers the precision of the true classes, because those predictions are wrong;
- precision of a class never predicted is 0, as is F1 when precision + recall is 0;
- `nll` is the mean negative log-likelihood of the true class under softmax;
- `ece` (expected calibration error of the top-1 score, Guo et al. 2017): the scores are
  put in 15 equal-width bins ((0, 1/15], (1/15, 2/15], ..., a score of exactly 0 goes in the
  first), and ECE = sum over bins of (n_bin / N) * |mean score in bin - accuracy in bin|;
- `ece_if_calibrated`: the median ECE that a *perfectly* calibrated model with the same top-1
  scores would show on the same number of images (each image correct with probability equal to
  its score; 200 seeded draws). ECE is a biased estimate: on 199 photos with scores spread over
  0.3-1 it is ~0.08 for a perfect model, so an ECE is only evidence of miscalibration well above this;
- the confusion matrix covers the labels that occur in the data or in the predictions,
  rows = true label, columns = predicted label, in the order given by `labels`.
"""

from __future__ import annotations

import math
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
        "ece": expected_calibration_error(log_probs.exp().max(-1).values, preds == targets),
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


ECE_BINS = 15


def reliability_bins(scores: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per equal-width bin of the top-1 score: lower/upper edge, count, mean score, accuracy (empty bins too)."""
    s, c = scores.double().flatten(), correct.double().flatten()
    idx = (s * bins).ceil().long().clamp(1, bins) - 1  # (k/bins, (k+1)/bins] -> k; 0 -> first bin
    out = []
    for k in range(bins):
        m = idx == k
        n = int(m.sum())
        out.append({"lower": k / bins, "upper": (k + 1) / bins, "count": n,
                    "confidence": float(s[m].mean()) if n else None, "accuracy": float(c[m].mean()) if n else None})
    return out


def expected_calibration_error(scores: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE of the top-1 score: sum over bins of (share of images) x |mean score - accuracy| (see module doc)."""
    n = int(scores.numel())
    if n == 0:
        return float("nan")
    return float(sum(b["count"] / n * abs(b["confidence"] - b["accuracy"])
                     for b in reliability_bins(scores, correct, bins) if b["count"]))


def ece_if_calibrated(scores: torch.Tensor, draws: int = 200, bins: int = ECE_BINS, seed: int = 0) -> float:
    """Median ECE of a perfectly calibrated model with these top-1 scores on this many images (the noise floor)."""
    s = scores.double().flatten()
    if s.numel() == 0:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    vals = [expected_calibration_error(s, torch.rand(s.shape, generator=g, dtype=torch.float64) < s, bins)
            for _ in range(draws)]
    return float(torch.tensor(vals).median())


def auroc(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> float:
    """Area under the ROC curve = P(positive scores higher than negative), ties counting half (Mann-Whitney U)."""
    p, q = pos_scores.double().flatten(), neg_scores.double().flatten()
    if not len(p) or not len(q):
        return float("nan")
    greater = (p[:, None] > q[None, :]).double().sum()
    ties = (p[:, None] == q[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(p) * len(q)))


def fpr_at_tpr(pos_scores: torch.Tensor, neg_scores: torch.Tensor, tpr: float = 0.95) -> float:
    """Share of negatives scoring at or above the highest threshold that keeps >= `tpr` of positives."""
    p = pos_scores.double().flatten().sort(descending=True).values
    if not len(p) or not len(neg_scores):
        return float("nan")
    k = min(len(p), max(1, math.ceil(tpr * len(p) - 1e-9)))
    return float((neg_scores.double() >= p[k - 1]).double().mean())
