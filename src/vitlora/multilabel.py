"""Multi-label classification: several labels per image, one sigmoid per label.

A manifest whose label field holds several labels (CSV `a.jpg,raccoon|cat`, JSONL
`"labels": ["raccoon", "cat"]`) makes a multi-label run, detected from the data. Such a run
trains the replace-mode head with BCE-with-logits (each label a yes/no question, so no softmax
competition between the labels of one image), picks the best epoch by mean average
precision on the held-out split, and stores one decision threshold per label (tuned there to
maximise F1) in `labels.json` beside `"problem_type": "multi_label_classification"`
(transformers' own field, so a merged model's `config.json` makes `pipeline()` use sigmoid).

Everything here is a pure function of samples, tensors and the run's files; the loop,
evaluation, run and CLI call it through short hooks.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .errors import VitloraError

if TYPE_CHECKING:  # vitlora.data imports this module lazily (manifest parsing): no import at load time
    from .data.samples import Sample

PROBLEM_TYPE = "multi_label_classification"
DEFAULT_THRESHOLD = 0.5


# ---- data ------------------------------------------------------------------------------


def sample_labels(sample: Sample) -> tuple[str, ...]:
    """The labels of a sample: its label set (multi-label rows) or its one label."""
    if sample.labels is not None:
        return sample.labels
    return (sample.label,) if sample.label is not None else ()


def is_multi_label(samples: Iterable[Sample]) -> bool:
    """Any row with several labels (`|`) or a `labels` list makes the whole data multi-label."""
    return any(s.labels is not None for s in samples)


def check_mode(mode: str) -> None:
    if mode != "replace":
        raise VitloraError("multi-label data (labels separated by '|' or a \"labels\" list) trains in replace mode "
                           f"only, not {mode} mode; drop --mode extend / --label")


def split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of the images by a seeded shuffle; every label must keep a training image.

    A per-label stratification is ill-defined when images carry several labels; a seeded
    ``random.Random`` shuffle is deterministic on every machine, and the check below turns an
    unlucky split of a rare label into one clear sentence instead of a head row never trained.
    """
    if not 0.0 <= fraction < 1.0:
        raise VitloraError(f"validation fraction must be in [0, 1), got {fraction}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    k = round(fraction * len(samples))
    if fraction > 0 and len(samples) >= 2:
        k = max(k, 1)
    val_idx = set(order[: min(k, len(samples) - 1)])
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    check_labels_trained(train, sorted({lab for s in samples for lab in sample_labels(s)}), "after the split")
    return train, val


def check_labels_trained(train: Iterable[Sample], labels: Sequence[str], when: str) -> None:
    have = {lab for s in train for lab in sample_labels(s)}
    missing = [lab for lab in labels if lab not in have]
    if missing:
        raise VitloraError(f"label(s) {', '.join(missing[:10])} have no training image {when}; add images with "
                           "them, lower --val-split or pass --val")


def build_cache(samples: Sequence[Sample], label2id: dict[str, int], pp: Any, train: bool,
                num_labels: int | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """`vitlora.data.build_cache` with multi-hot float targets [N, C] (row i: the labels of kept image i).

    C is `num_labels` (the model's, when the data has only some of them), else `len(label2id)`.
    """
    from .data import build_cache as decode_cache
    from .data.cache import check_known_labels

    check_known_labels((lab for s in samples for lab in sample_labels(s)), label2id)
    cache, report = decode_cache(samples, None, pp, train=train, **kwargs)
    targets = torch.zeros(len(cache), num_labels or len(label2id))
    kept = iter(enumerate(cache.paths))
    i, path = next(kept, (None, None))
    for s in samples:  # the cache keeps the readable samples in input order
        if s.path == path:
            targets[i, [label2id[lab] for lab in sample_labels(s)]] = 1.0
            i, path = next(kept, (None, None))
    cache.labels = targets
    if train:
        missing = [lab for lab, j in label2id.items() if not targets[:, j].any()]
        if missing:
            raise VitloraError(f"label(s) {', '.join(missing[:10])} have no readable training image "
                               f"({report.summary(max_paths=3)}); add readable images or remove them")
    return cache, report


def is_multi_hot(cache: Any) -> bool:
    return getattr(cache, "labels", None) is not None and cache.labels.ndim == 2


# ---- training and metrics --------------------------------------------------------------


def center_bias(head: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor) -> None:
    """Each label's bias put halfway between its mean logit on positives and on negatives.

    Imprinted rows (class-mean features, see `vitlora.heads`) rank images well but score every
    image high (DeiT-tiny collages: positives ~8, negatives ~4.5), a sigmoid of ~1 everywhere
    and a first-batch BCE of ~6; centred, the first steps refine the ranking instead.
    """
    with torch.no_grad():
        scores = features.float() @ head.weight.float().T.cpu() + head.bias.float().cpu()
        for c in range(targets.shape[1]):
            pos, neg = scores[targets[:, c] > 0, c], scores[targets[:, c] == 0, c]
            if len(pos) and len(neg):
                head.bias[c] -= float(pos.mean() + neg.mean()) / 2


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Per-image sum over labels of BCE-with-logits, meaned over the batch (targets smoothed toward 1/2)."""
    t = targets.float() * (1.0 - smoothing) + 0.5 * smoothing
    return F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none").sum(-1).mean()


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Area under the step precision-recall curve, as scikit-learn's `average_precision_score`.

    AP = sum over distinct score thresholds of (R_n - R_{n-1}) * P_n; tied scores are one
    threshold. None when `targets` has no positive (AP is undefined there).
    """
    targets = targets.float()
    if targets.sum() == 0:
        return None
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, t = scores.double()[order], targets.double()[order]
    last = torch.cat([torch.nonzero(s[1:] != s[:-1]).flatten(), torch.tensor([len(s) - 1])])
    tp = torch.cumsum(t, 0)[last]
    precision = tp / (last + 1).double()
    recall = tp / tp[-1]
    steps = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((steps * precision).sum())


def best_threshold(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """The threshold maximising F1 on held-out data (0.5 without positives).

    Candidates are the distinct held-out scores; the chosen one is moved halfway down to the
    next lower score so that unseen images scoring between the two count as positives too.
    """
    if targets.sum() == 0:
        return DEFAULT_THRESHOLD
    values = torch.unique(probs.float()).flip(0)  # descending
    pos = targets.bool()
    f1 = torch.stack([2 * (pos & (probs >= v)).sum() / (pos.sum() + (probs >= v).sum()) for v in values])
    k = int(torch.argmax(f1))  # first maximum: the highest threshold of the ties
    return float(values[k] if k + 1 == len(values) else (values[k] + values[k + 1]) / 2)


def report(logits: torch.Tensor, targets: torch.Tensor, id2label: dict[int, str],
           thresholds: Sequence[float]) -> dict[str, Any]:
    """Multi-label metrics: macro AP, per-label precision/recall/F1 at `thresholds`, subset accuracy, BCE.

    Means over labels are over the labels present in the data (support > 0), as single-label
    metrics are; `per_class` also gives each label's AP and threshold.
    """
    probs, targets = torch.sigmoid(logits.float()), targets.float()
    pred = probs >= torch.tensor(thresholds, dtype=probs.dtype)
    per_class: dict[str, dict[str, Any]] = {}
    for c in range(targets.shape[1]):
        support = int(targets[:, c].sum())
        if support == 0:
            continue
        tp, predicted = int((pred[:, c] & targets[:, c].bool()).sum()), int(pred[:, c].sum())
        precision, recall = (tp / predicted if predicted else 0.0), tp / support
        per_class[id2label[c]] = {
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "support": support, "average_precision": average_precision(probs[:, c], targets[:, c]),
            "threshold": float(thresholds[c]),
        }

    def macro(key: str) -> float | None:
        return sum(v[key] for v in per_class.values()) / len(per_class) if per_class else None

    return {
        "n_images": len(targets), "problem_type": PROBLEM_TYPE,
        "mean_average_precision": macro("average_precision"),
        "subset_accuracy": float((pred == targets.bool()).all(1).float().mean()),
        "macro_precision": macro("precision"), "macro_recall": macro("recall"), "macro_f1": macro("f1"),
        "bce": float(bce_loss(logits, targets)), "per_class": per_class,
    }


def validation(logits: torch.Tensor, targets: torch.Tensor, id2label: dict[int, str]) -> tuple[dict[str, Any],
                                                                                                  dict[str, float]]:
    """One epoch's held-out record (val_loss, val_accuracy = subset accuracy, val_macro_f1, val_map) and the
    thresholds tuned on it; the metrics are at those thresholds."""
    probs = torch.sigmoid(logits.float())
    thresholds = [best_threshold(probs[:, c], targets[:, c]) for c in range(targets.shape[1])]
    rep = report(logits, targets, id2label, thresholds)
    record = {"val_loss": rep["bce"], "val_accuracy": rep["subset_accuracy"], "val_macro_f1": rep["macro_f1"],
              "val_map": rep["mean_average_precision"]}
    return record, {id2label[c]: t for c, t in enumerate(thresholds)}


# ---- a trained run ---------------------------------------------------------------------


def run_fields(labels: Sequence[str]) -> dict[str, Any]:
    """What `labels.json` says of a multi-label run before any validation: the problem type, 0.5 everywhere."""
    return {"problem_type": PROBLEM_TYPE, "thresholds": {lab: DEFAULT_THRESHOLD for lab in labels}}


def is_multi_label_run(labels_info: dict[str, Any]) -> bool:
    return labels_info.get("problem_type") == PROBLEM_TYPE


def thresholds_of(labels_info: dict[str, Any], id2label: dict[int, str]) -> list[float]:
    """Per-label thresholds in id order (0.5 for a label the file lacks)."""
    stored = labels_info.get("thresholds") or {}
    return [float(stored.get(id2label[i], DEFAULT_THRESHOLD)) for i in range(len(id2label))]


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Sigmoid per label for a multi-label run, softmax over the labels otherwise."""
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def over_threshold(probs: torch.Tensor, id2label: dict[int, str], thresholds: Sequence[float]) -> list[list[str]]:
    """For each row of sigmoid `probs`, every label at or over its threshold, most likely first."""
    out = []
    for row in probs.float():
        ids = [i for i in torch.argsort(row, descending=True, stable=True).tolist() if row[i] >= thresholds[i]]
        out.append([id2label[i] for i in ids])
    return out
