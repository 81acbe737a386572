"""Replace mode with `--negatives`: the training loop's hook that teaches "none of these".

Same interface as `vitlora.extend.Extender` (`batch`, `loss`, `validate`, `score`; the loop
never imports this module): each step appends as many negatives as positives (the
un-augmented view, the same walk as extend mode's), and the loss adds outlier exposure on
them (`calibration.replace_loss`). After training, `place_unknown` appends the "unknown"
row (see `vitlora.calibration`) and measures it on the held-out negatives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .calibration import append_unknown_row, rejection_scores, replace_loss, unknown_bias, with_unknown
from .extend import load_negatives, negative_indices
from .heads import eval_view
from .inference import cache_logits
from .metrics import auroc, fpr_at_tpr


class Rejector:
    """Negatives in replace mode: outlier exposure while training, the "unknown" row at the end."""

    def __init__(self, peft_model: nn.Module, config: Any, pp: Any, device: torch.device, val_cache: Any,
                 neg_train: Any, neg_val: Any, log: Callable[[str], None], rank: int = 0) -> None:
        self.model, self.config, self.pp, self.device = peft_model, config, pp, device
        self.val_cache, self.neg_train, self.neg_val = val_cache, neg_train, neg_val
        self.log, self.rank = log, rank

    def batch(self, x: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, epoch: int,
              step: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Append len(idx) negatives with label -1."""
        nidx = negative_indices(len(self.neg_train), self.config.seed, epoch, self.rank, step, len(idx))
        images, _ = self.neg_train.batch(nidx)
        xn = eval_view(images.to(x.device), self.pp, size=tuple(x.shape[-2:])).to(x.dtype)
        neg_labels = torch.full((len(nidx),), -1, dtype=labels.dtype, device=labels.device)
        return torch.cat([x, xn]), torch.cat([labels, neg_labels]), None

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, teacher: Any) -> torch.Tensor:
        return replace_loss(logits, labels, self.config.label_smoothing, self.config.oe_weight)

    def _neg_logits(self) -> torch.Tensor | None:
        return cache_logits(self.model, self.neg_val, self.pp, self.device) if self.neg_val is not None else None

    def validate(self, val_logits: torch.Tensor) -> dict[str, Any]:
        """Epoch metric: AUROC of in-task validation photos against held-out negatives (max softmax score)."""
        neg = self._neg_logits()
        if neg is None:
            return {}
        return {"rejection_auroc": auroc(rejection_scores(val_logits), rejection_scores(neg))}

    def score(self, record: dict[str, Any]) -> float:
        """Best epoch: mean of validation accuracy and rejection AUROC (where measured)."""
        parts = [record.get("val_accuracy", 0.0)] + ([record["rejection_auroc"]] if "rejection_auroc" in record
                                                     else [])
        return float(sum(parts) / len(parts))

    def place_unknown(self, head: nn.Linear, val_logits: torch.Tensor, summary: dict[str, Any],
                      labels_info: dict[str, Any]) -> dict[str, Any]:
        """Append "unknown" with its bias from the (calibrated) validation logits; record and print what it does."""
        keep = self.config.unknown_keep
        b = unknown_bias(val_logits, keep)
        neg = self._neg_logits()  # the head is already calibrated; "unknown" not yet appended
        append_unknown_row(head, b)
        kept = val_logits.max(-1).values > b
        y = self.val_cache.labels
        rej = {"bias": b, "keep_target": keep, "n_val": len(y), "val_kept": float(kept.float().mean()),
               "val_accuracy_after": float(((val_logits.argmax(-1) == y) & kept).float().mean())}
        line = (f"unknown: bias {b:.3f} keeps {rej['val_kept']:.3f} of {len(y)} validation photos (they set it)")
        if neg is not None:
            scores_in, scores_out = rejection_scores(val_logits), rejection_scores(neg)
            rej.update(n_negatives=len(neg), negatives_rejected=float((neg.max(-1).values <= b).float().mean()),
                       auroc=auroc(scores_in, scores_out), fpr_at_95_tpr=fpr_at_tpr(scores_in, scores_out, 0.95))
            line += (f"; rejects {rej['negatives_rejected']:.3f} of {len(neg)} held-out negatives (AUROC "
                     f"{rej['auroc']:.3f})")
        else:
            line += "; no negatives held out, so the share rejected was not measured"
        self.log(line)
        summary["rejection"] = rej
        return with_unknown(labels_info, b)


def prepare_reject(peft_model: nn.Module, config: Any, val_cache: Any, pp: Any, device: torch.device,
                   log: Callable[[str], None], progress: bool = False, rank: int = 0) -> Rejector | None:
    """The replace-mode hook when `--negatives` is given, else None (plain cross-entropy)."""
    neg_train, neg_val = load_negatives(config, pp, log, progress)
    if neg_train is None or not len(neg_train):
        return None
    return Rejector(peft_model, config, pp, device, val_cache, neg_train, neg_val, log, rank)
