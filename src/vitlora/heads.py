"""Head helpers both modes use: the trained head copy, the frozen base's outputs, imprinting new rows.

New head rows start as the class mean of the frozen base's features (`imprint_new_rows`; see
`vitlora.extend` for why), which needs one pass of the base over the training images
(`base_outputs`, which extend mode reuses as its cached teacher).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .extend_math import imprint_rows
from .inference import batched_logits, eval_mode


def trainable_head(peft_model: nn.Module, head_name: str) -> nn.Linear:
    """The head copy that trains and is saved (PEFT `modules_to_save`), or the head itself."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    module = getattr(base, head_name)
    copies = getattr(module, "modules_to_save", None)
    if copies is not None:
        name = getattr(module, "active_adapter", None) or "default"
        name = name[0] if isinstance(name, (list, tuple)) else name
        return copies[name]
    return module


def eval_view(images: torch.Tensor, pp: Any, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Normalised eval-size view of a work-size uint8 batch (the center of what eval would crop);
    `size` resizes it to another side instead (negatives beside `--train-size` crops)."""
    from .data import normalize

    x = images.float()
    s = x.shape[-1]
    if pp.resize_mode == "exact" and pp.resize_size:
        frac = pp.height / pp.resize_size[0]
    elif pp.resize_mode == "shortest_edge" and pp.shortest_edge:
        frac = min(pp.height, pp.width) / pp.shortest_edge
    else:
        frac = 1.0
    if frac < 1.0:
        keep = max(1, round(s * frac))
        top = (s - keep) // 2
        x = x[..., top : top + keep, top : top + keep]
    x = F.interpolate(x, size=size or (pp.height, pp.width), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x.round().clamp(0, 255), pp)


@dataclass
class BaseOutputs:
    """The frozen base's head inputs (features) and logits, one row per cached image."""

    features: torch.Tensor
    logits: torch.Tensor


def base_outputs(peft_model: nn.Module, head_name: str, cache: Any, pp: Any, device: torch.device,
                 work_size: bool, batch_size: int = 64, adapter: bool = False) -> BaseOutputs:
    """Run the frozen base (adapter disabled; `adapter=True`: the trained model) over a cache, un-augmented;
    CPU float32 head inputs and logits."""
    from .data import normalize

    def forward(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device)
        return peft_model(pixel_values=eval_view(images, pp) if work_size else normalize(images, pp)).logits

    wrapper = getattr(peft_model.get_base_model(), head_name)
    feats: list[torch.Tensor] = []
    hook = wrapper.register_forward_hook(lambda m, args, out: feats.append(args[0].detach().float().cpu()))
    try:
        with eval_mode(peft_model), (nullcontext() if adapter else peft_model.disable_adapter()):
            logits = batched_logits(cache, forward, batch_size)
    finally:
        hook.remove()
    return BaseOutputs(torch.cat(feats), logits)


def new_ids_of(change: Any) -> list[int]:
    ids = {lab: i for i, lab in enumerate(change.labels)}
    return [ids[lab] for lab in change.new_labels]


def imprint_new_rows(peft_model: nn.Module, change: Any, train_cache: Any, pp: Any, device: torch.device,
                     log: Callable[[str], None] = lambda m: None) -> BaseOutputs | None:
    """Initialise the head rows of new labels by imprinting (both modes); returns the base's outputs.

    In replace mode with every label known to the base there is nothing to imprint (None).
    """
    new_ids = new_ids_of(change)
    if change.mode == "replace" and not new_ids:
        return None
    outs = base_outputs(peft_model, change.head_name, train_cache, pp, device, work_size=True)
    if new_ids and change.row_norm:
        rows = imprint_rows(outs.features, train_cache.labels, new_ids, change.row_norm)
        head = trainable_head(peft_model, change.head_name)
        with torch.no_grad():
            head.weight[new_ids] = rows.to(head.weight)
            if head.bias is not None:
                head.bias[new_ids] = change.bias_mean
        log(f"imprinted {len(new_ids)} new head row{'s' if len(new_ids) != 1 else ''} from class-mean features "
            f"(norm {change.row_norm:.3f}, bias {change.bias_mean:.3f})")
    return outs


def freeze_rows(param: nn.Parameter, n_old: int) -> None:
    """Rows [:n_old] never change: zero gradient (Adam then moves them by exactly 0) and no weight decay."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:n_old] = 0
        return grad

    param.register_hook(hook)
    param.no_weight_decay = True  # read by loop.make_optimizer: decoupled decay would shrink the frozen rows


def reload_best(peft_model: nn.Module, out: Any) -> None:
    """Put the best epoch's adapter (saved in the run folder `out`) back into the model."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, load_peft_weights(str(out), device="cpu"))
