"""Honest probabilities and "none of these" for replace-mode runs (pure math first, then the run steps).

* **Temperature scaling** (Guo et al. 2017, `fit_temperature`): one scalar T minimising the
  NLL of the validation split's logits (photos no step trained on). It is folded into the
  head (`fold_temperature`: weight and bias divided by T), so every consumer - `predict`,
  `serve`, the merged model under `pipeline()`, the ONNX export, a plain-peft reload - gives
  the same calibrated numbers without knowing T; T is recorded under `calibration` in
  `vitlora.json` / `metrics.json`.
* **Outlier exposure** (Hendrycks et al. 2019, `outlier_exposure_loss`): with `--negatives`
  in replace mode each step also sees as many negatives as positives, whose target is the
  uniform distribution over the task's classes.
* **The "unknown" row** (`append_unknown_row`): after training and temperature scaling a
  row of zero weights and bias b is appended, so "unknown" wins by plain argmax exactly when
  no class's logit reaches b, for every consumer. b is placed so that `--unknown-keep` of
  the held-out in-task photos keep their answer (their max logit beats b:
  `extend_math.positive_threshold`, the same quantile rule as extend mode's threshold);
  held-out negatives only measure it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .extend_math import positive_threshold

UNKNOWN = "unknown"
OE_WEIGHT = 0.5  # Hendrycks et al.'s weight of the outlier-exposure term


def _fit_temperature(nll: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """The T > 0 minimising `nll(T)` (a scalar tensor); LBFGS on log T, clamped to [0.05, 20]."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll(log_t.exp())
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising mean NLL of softmax(logits / T) (convex in 1/T)."""
    z, y = logits.detach().double(), labels.long()
    return _fit_temperature(lambda t: F.cross_entropy(z / t, y))


def fit_extend_temperature(logits: torch.Tensor, labels: torch.Tensor, n_old: int) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) over positives (their class) and negatives
    (label -1: -log of the mass left to the old classes); dividing every logit by T keeps every answer.

    Capping the new rows made the new class's scores honest about ranking but low (ECE 0.196 on fold 0's
    fresh raccoons); the base's own scores are low too (DeiT-tiny: mean top-1 score 0.62 at 0.80 accuracy).
    Fitted here (T = 0.25 on fold 0), the fresh raccoons' ECE was 0.034 and ImageNet's 0.152 (0.187 before).
    Without negatives nothing says how sure to be off the new class: not fitted (`crossfit`).
    """
    z, y = logits.detach().double(), labels.long()
    pos, neg = y >= 0, y == -1
    n = max(1, int(pos.sum() + neg.sum()))

    def nll(t: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(z / t, dim=-1)
        return (-log_p[pos, y[pos]].sum() - torch.logsumexp(log_p[neg, :n_old], dim=-1).sum()) / n

    return _fit_temperature(nll)


def fold_temperature(head: nn.Linear, temperature: float) -> None:
    """Divide the head's weight and bias by T: its logits become logits / T for every consumer."""
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)


def outlier_exposure_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against the uniform distribution: logsumexp(z) - mean(z)."""
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - z.mean(dim=-1)


def replace_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float,
                 oe_weight: float = OE_WEIGHT) -> torch.Tensor:
    """Cross-entropy on labelled rows (>= 0) + oe_weight x outlier exposure on negatives (label -1), each a mean."""
    pos, neg = labels >= 0, labels < 0
    total = logits.new_zeros((), dtype=torch.float32)
    if pos.any():
        total = total + F.cross_entropy(logits[pos].float(), labels[pos], label_smoothing=label_smoothing)
    if neg.any():
        total = total + oe_weight * outlier_exposure_loss(logits[neg]).mean()
    return total


def unknown_bias(in_task_logits: torch.Tensor, keep: float) -> float:
    """Bias b of the zero-weight "unknown" row: about `keep` of these photos have a max logit above b."""
    return positive_threshold(in_task_logits.float().max(dim=-1).values, keep)


def append_unknown_row(head: nn.Linear, bias: float) -> None:
    """One more output: zero weights, bias `bias` (in place; the head's saved state grows by one row)."""
    with torch.no_grad():
        w = torch.cat([head.weight, head.weight.new_zeros(1, head.in_features)])
        b = torch.cat([head.bias if head.bias is not None else head.weight.new_zeros(head.out_features),
                       head.weight.new_full((1,), bias)])
    head.weight = nn.Parameter(w, requires_grad=head.weight.requires_grad)
    head.bias = nn.Parameter(b, requires_grad=w.requires_grad)
    head.out_features += 1


def rejection_scores(logits: torch.Tensor) -> torch.Tensor:
    """How in-task a photo looks: the max softmax probability over the task's classes (higher: keep it)."""
    return torch.softmax(logits.float(), dim=-1).max(dim=-1).values


def with_unknown(labels_info: dict[str, Any], bias: float) -> dict[str, Any]:
    """labels.json with "unknown" appended as the last id and the rejection recorded."""
    n = len(labels_info["id2label"])
    return {**labels_info, "id2label": {**labels_info["id2label"], str(n): UNKNOWN},
            "label2id": {**labels_info["label2id"], UNKNOWN: n},
            "rejection": {"label": UNKNOWN, "id": n, "bias": bias}}


def finish_replace(peft_model: nn.Module, head: nn.Linear, config: Any, val_cache: Any, pp: Any,
                   device: torch.device, log: Callable[[str], None], rejector: Any = None,
                   labels_info: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """After training (best epoch loaded): temperature on the validation split, then the "unknown" row.

    Returns (summary for vitlora.json "calibration", new labels.json or None when unchanged).
    """
    from .inference import cache_logits
    from .metrics import expected_calibration_error

    summary: dict[str, Any] = {"temperature": None}
    if val_cache is None or not len(val_cache):
        log("warning: no validation photos (--val-split 0 and no --val): probabilities were not calibrated"
            + (" and the 'unknown' answer could not be placed" if rejector is not None else ""))
        return summary, None
    logits = cache_logits(peft_model, val_cache, pp, device)
    y = val_cache.labels
    if not config.no_calibrate:
        correct = logits.argmax(-1) == y
        # with every validation photo right, NLL falls as T -> 0: those photos cannot say how far to sharpen
        t = fit_temperature(logits, y) if not correct.all() else max(1.0, fit_temperature(logits, y))
        fold_temperature(head, t)
        ece_before = expected_calibration_error(torch.softmax(logits, -1).max(-1).values, correct)
        ece_after = expected_calibration_error(torch.softmax(logits / t, -1).max(-1).values, correct)
        summary.update(temperature=t, n_images=len(y), val_ece_before=ece_before, val_ece_after=ece_after)
        log(f"calibration: temperature {t:.3f} fitted on {len(y)} validation photos and folded into the head "
            f"(their ECE {ece_before:.3f} -> {ece_after:.3f}; these photos chose T, so check fresh ones with "
            "vitlora eval)")
        logits = logits / t
    if rejector is None or labels_info is None:
        return summary, None
    return summary, rejector.place_unknown(head, logits, summary, labels_info)
