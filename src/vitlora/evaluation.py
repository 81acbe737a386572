"""Evaluate a run on labelled data (and, in extend mode, on negatives): the numbers `vitlora eval` prints.

Labels are matched to the model's labels like training matches them (case, `_`, `-` and
spaces ignored), so an ImageFolder `Red_Fox/` evaluates against the base's `red fox`.
"""

from __future__ import annotations

from typing import Any

import torch

from . import multilabel
from .errors import VitloraError
from .extend_math import shift_metrics
from .inference import batched_logits
from .metrics import auroc, classification_report, ece_if_calibrated, fpr_at_tpr, reliability_bins
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
    from .data import build_cache, discover

    source = discover(data, label=label)
    label2id = data_label_ids(run, source.labels)
    if run.multi_label:  # multi-hot targets; mAP and per-label metrics at the stored thresholds
        cache, report = multilabel.build_cache(source.samples, label2id, run.preprocess, train=False, strict=strict,
                                               draft=False, num_labels=len(run.id2label))
        result = multilabel.report(_run_logits(run, cache, batch_size), cache.labels, run.id2label,
                                   multilabel.thresholds_of(run.labels_info, run.id2label))
    else:
        if any(len(multilabel.sample_labels(s)) != 1 for s in source.samples):
            raise VitloraError(f"{data} has images with several (or no) labels; {run.run_dir} is a single-label run")
        if source.shards is not None:  # WebDataset shards: every sample, decoded as predict does
            cache, report = source.shards.decode_split("all", label2id, run.preprocess, 0.0, draft=False)
        else:
            cache, report = build_cache(source.samples, label2id, run.preprocess, train=False, strict=strict,
                                        draft=False)
        logits = _run_logits(run, cache, batch_size)
        result = classification_report(logits, cache.labels, run.id2label)
        if len(cache):  # the reliability diagram's bins (top-1 softmax score against accuracy)
            top1 = torch.softmax(logits, -1).max(-1).values
            result["reliability"] = reliability_bins(top1, logits.argmax(-1) == cache.labels)
            result["ece_if_calibrated"] = ece_if_calibrated(top1)  # what ECE a perfect model shows on these
    result["skipped"] = report.count
    if report.count:
        result["skipped_files"] = [{"path": p, "reason": r} for p, r in report.skipped[:20]]
    result["data"] = data
    return result


def _run_logits(run: Run, cache: Any, batch_size: int = 64) -> torch.Tensor:
    from .data import normalize

    return batched_logits(cache, lambda images: run.logits(normalize(images, run.preprocess)), batch_size)


def negative_metrics(run: Run, data: str, negatives_dir: str, label: str | None = None,
                     base: torch.nn.Module | None = None, batch_size: int = 64) -> dict[str, Any]:
    """`eval --negatives`: new_class_recall (per new class and mean) on DATA, false_positive_rate and retention on the negatives.

    `retention` compares with the run's base model without this run's adapter (for a run
    stacked on another run: that run, merged), loaded from `vitlora.json` unless `base` is given.
    """
    from .data import Sample, build_cache, discover, expand_image_paths, normalize
    from .modeling import load_base

    if run.labels_info.get("mode", run.settings.get("mode")) != "extend":
        return rejection_metrics(run, data, negatives_dir, label, batch_size)
    n_old = int(run.labels_info["base_num_labels"])
    label2id = {lab: i for i, lab in run.id2label.items()}
    new_ids = [label2id[lab] for lab in run.new_labels]
    source = discover(data, label=label)
    ids = data_label_ids(run, source.labels)
    pos_samples = [s for s in source.samples if ids[s.label] in new_ids]
    recall: dict[str, Any] = {}
    if pos_samples:
        cache, _ = build_cache(pos_samples, ids, run.preprocess, train=False)
        rec = shift_metrics(_run_logits(run, cache, batch_size), cache.labels, n_old, new_ids)["recall"]
        recall = {run.id2label[c]: r for c, r in rec.items()}
        recall["mean"] = sum(rec.values()) / len(rec)

    paths = expand_image_paths([negatives_dir])
    neg_cache, report = build_cache([Sample(p, None) for p in paths], None, run.preprocess, train=False)
    neg_logits = _run_logits(run, neg_cache, batch_size)
    if base is None:
        base, _ = load_base(run.settings["base_model"], "cpu")
    base = base.to(run.device).eval()
    base_logits = batched_logits(
        neg_cache, lambda images: base(pixel_values=normalize(images, run.preprocess).to(run.device)).logits,
        batch_size)
    m = shift_metrics(neg_logits, None, n_old, new_ids, base_logits[:, :n_old].argmax(-1))
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


def rejection_metrics(run: Run, data: str, negatives_dir: str, label: str | None = None,
                      batch_size: int = 64) -> dict[str, Any]:
    """`eval --negatives` in replace mode: how well the run tells its task's photos (DATA) from other photos.

    The score is the max logit over the task's classes ("unknown" left out): the run answers
    "unknown" exactly when it is below the unknown row's bias, and for a run trained without
    negatives it is the usual max-logit out-of-distribution score. `rejection_auroc` and
    `fpr_at_95_tpr` (share of negatives scoring at least as high as the 95 % of DATA kept) are
    threshold-free; `negatives_rejected` / `in_task_rejected` are the run's own answers.
    """
    from .data import Sample, build_cache, discover, expand_image_paths

    rejection = run.labels_info.get("rejection")
    task = [i for i in sorted(run.id2label) if not rejection or i != rejection["id"]]
    source = discover(data, label=label)
    cache, _ = build_cache(source.samples, data_label_ids(run, source.labels), run.preprocess, train=False)
    neg_cache, report = build_cache([Sample(p, None) for p in expand_image_paths([negatives_dir])], None,
                                    run.preprocess, train=False)
    if not len(cache) or not len(neg_cache):
        raise VitloraError("--negatives needs readable photos both in DATA and in the negatives folder")
    pos, neg = _run_logits(run, cache, batch_size), _run_logits(run, neg_cache, batch_size)
    s_pos, s_neg = pos[:, task].max(-1).values, neg[:, task].max(-1).values
    out: dict[str, Any] = {"rejection_auroc": auroc(s_pos, s_neg), "fpr_at_95_tpr": fpr_at_tpr(s_pos, s_neg, 0.95),
                           "n_negatives": len(neg_cache), "negatives_skipped": report.count,
                           "negatives": negatives_dir}
    if rejection:
        out["negatives_rejected"] = float((neg.argmax(-1) == rejection["id"]).float().mean())
        out["in_task_rejected"] = float((pos.argmax(-1) == rejection["id"]).float().mean())
    return out
