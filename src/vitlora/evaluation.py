"""Evaluate a run on labelled data: the numbers `vitlora eval` prints and writes.

Labels are matched to the model's labels like training matches them (case, `_`, `-` and
spaces ignored), so an ImageFolder `Red_Fox/` evaluates against the base's `red fox`.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import VitloraError
from .metrics import classification_report
from .run import Run
from .surgery import normalize_label


def data_label_ids(run: Run, data_labels: list[str]) -> dict[str, int]:
    """Model id for each data label; unknown labels are an error that names them."""
    known = {normalize_label(lab): i for i, lab in run.id2label.items()}
    # labels the run was trained with under another spelling (extend mode maps them onto base classes)
    for lab, i in run.labels_info.get("data_label2id", {}).items():
        known.setdefault(normalize_label(lab), int(i))
    unknown = [lab for lab in data_labels if normalize_label(lab) not in known]
    if unknown:
        raise VitloraError(
            f"the data has labels the model does not know: {', '.join(unknown[:10])}"
            + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
        )
    return {lab: known[normalize_label(lab)] for lab in data_labels}


def evaluate(run: Run, data: str, label: str | None = None, strict: bool = False,
             batch_size: int = 64) -> dict[str, Any]:
    """Metrics of `run` on DATA (any format `vitlora train` accepts)."""
    from .data import build_cache, discover, normalize

    source = discover(data, label=label)
    label2id = data_label_ids(run, source.labels)
    cache, report = build_cache(source.samples, label2id, run.preprocess, train=False, strict=strict, draft=False)
    logits = []
    for start in range(0, len(cache), batch_size):
        images, _ = cache.batch(torch.arange(start, min(start + batch_size, len(cache))))
        logits.append(run.logits(normalize(images, run.preprocess)).cpu())
    result = classification_report(torch.cat(logits), cache.labels, run.id2label)
    result["skipped"] = report.count
    if report.count:
        result["skipped_files"] = [{"path": p, "reason": r} for p, r in report.skipped[:20]]
    result["data"] = data
    return result
