"""Classifier-head surgery: replace the head for a new task, or extend it with new classes.

Extending keeps the base model's behaviour on its own classes exactly: old weight rows
and biases are copied bit for bit, new rows start small (normal, std 0.02, bias 0) unless
the caller passes better initial rows; the training loop imprints them from class-mean
features afterwards (`vitlora.extend.imprint_new_rows`, scaled by `HeadChange.row_norm`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import VitloraError


def normalize_label(label: str) -> str:
    """Case-, `_`-, `-`- and space-insensitive form used to match labels."""
    return re.sub(r"[\s_\-]+", "", label).lower()


def label_aliases(label: str) -> list[str]:
    """A base label and its comma-separated synonyms ('tench, Tinca tinca'), normalised."""
    parts = [label] + [p for p in label.split(",") if p.strip()]
    return list(dict.fromkeys(normalize_label(p) for p in parts))


def match_labels(data_labels: list[str], base_labels: list[str]) -> dict[str, int]:
    """Map each data-set label that names an existing base class to that class's id."""
    index: dict[str, int] = {}
    for i, base in enumerate(base_labels):
        for alias in label_aliases(base):
            index.setdefault(alias, i)
    return {lab: index[normalize_label(lab)] for lab in data_labels if normalize_label(lab) in index}


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The top-level Linear that produces the logits (`classifier` for ViT/DeiT/BEiT/Swin)."""
    num_labels = getattr(model.config, "num_labels", None)
    for name in ("classifier", "head", "fc", "cls_classifier"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Linear):
            return name, module
    for name, module in model.named_children():
        if isinstance(module, nn.Linear) and module.out_features == num_labels:
            return name, module
    raise VitloraError(f"cannot find the classification head of {type(model).__name__}")


def _set_head(model: nn.Module, name: str, head: nn.Linear, id2label: dict[int, str]) -> None:
    setattr(model, name, head)
    model.config.num_labels = len(id2label)
    model.config.id2label = dict(id2label)
    model.config.label2id = {v: k for k, v in id2label.items()}


def _new_rows(n: int, in_features: int, init_rows: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if init_rows is not None:
        if init_rows.shape != (n, in_features):
            raise ValueError(f"init_rows must be {(n, in_features)}, got {tuple(init_rows.shape)}")
        return init_rows.to(like)
    rows = torch.empty(n, in_features, dtype=like.dtype, device=like.device)
    return nn.init.normal_(rows, mean=0.0, std=0.02)


def _head_stats(head: nn.Linear) -> tuple[float, float]:
    """(median row norm, mean bias) of a head: what imprinted rows are scaled to."""
    with torch.no_grad():
        norm = float(head.weight.float().norm(dim=1).median())
        bias = float(head.bias.float().mean()) if head.bias is not None else 0.0
    return norm, bias


@dataclass
class HeadChange:
    """What the surgery did, for logs, `vitlora.json` and tests."""

    mode: str
    head_name: str
    labels: list[str]  # final id order
    new_labels: list[str]  # labels that got fresh rows
    matched: dict[str, str]  # data label -> existing base label it was mapped to
    base_num_labels: int
    row_norm: float | None = None  # median norm of the base head's rows (scale for imprinted rows)
    bias_mean: float = 0.0  # mean bias of the base head (bias for imprinted rows)

    def data_label2id(self) -> dict[str, int]:
        """Id of each data-set label in the final head (matched labels use the base id)."""
        ids = {lab: i for i, lab in enumerate(self.labels)}
        if self.mode == "replace":
            return ids
        out = {lab: ids[base] for lab, base in self.matched.items()}
        out.update({lab: ids[lab] for lab in self.new_labels})
        return out


def extend_head(
    model: nn.Module,
    data_labels: list[str],
    init_rows: torch.Tensor | None = None,
    init_bias: torch.Tensor | None = None,
) -> HeadChange:
    """Grow the head by the data labels that the base does not know yet."""
    name, old = find_head(model)
    base_labels = [model.config.id2label[i] for i in range(old.out_features)]
    matched = match_labels(data_labels, base_labels)
    new_labels = [lab for lab in data_labels if lab not in matched]
    n_new = len(new_labels)
    head = nn.Linear(old.in_features, old.out_features + n_new, bias=old.bias is not None)
    head.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight[: old.out_features].copy_(old.weight)
        if n_new:
            head.weight[old.out_features :].copy_(_new_rows(n_new, old.in_features, init_rows, old.weight))
        if old.bias is not None:
            head.bias[: old.out_features].copy_(old.bias)
            head.bias[old.out_features :].copy_(init_bias if init_bias is not None else torch.zeros(n_new))
    id2label = {i: lab for i, lab in enumerate(base_labels + new_labels)}
    _set_head(model, name, head, id2label)
    return HeadChange(
        "extend", name, base_labels + new_labels, new_labels,
        {lab: base_labels[i] for lab, i in matched.items()}, len(base_labels), *_head_stats(old),
    )


def replace_head(model: nn.Module, data_labels: list[str]) -> HeadChange:
    """A fresh head over exactly the data labels; rows of labels the base knows start from the base."""
    if len(data_labels) < 2:
        raise VitloraError(
            f"replace mode needs at least 2 classes, the data has {len(data_labels)}; "
            "to add a class to the base model use --mode extend"
        )
    name, old = find_head(model)
    base_labels = [model.config.id2label[i] for i in range(old.out_features)]
    matched = match_labels(data_labels, base_labels)
    head = nn.Linear(old.in_features, len(data_labels), bias=True)
    head.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(_new_rows(len(data_labels), old.in_features, None, old.weight))
        head.bias.zero_()
        for i, lab in enumerate(data_labels):
            if lab in matched:
                head.weight[i].copy_(old.weight[matched[lab]])
                if old.bias is not None:
                    head.bias[i] = old.bias[matched[lab]]
    _set_head(model, name, head, dict(enumerate(data_labels)))
    return HeadChange(
        "replace", name, list(data_labels), [lab for lab in data_labels if lab not in matched],
        {lab: base_labels[i] for lab, i in matched.items()}, len(base_labels), *_head_stats(old),
    )
