"""`--train-size`: train on smaller crops than the model's input, evaluate and predict at full size.

A ViT's cost per image grows with its number of patch tokens: 160-px crops have 100 patches
where 224-px ones have 196, and a DeiT-tiny LoRA step runs about twice as fast. Random-resized
crops already show objects larger than the centre crop used at test time does; training at a
lower resolution evens that out (Touvron et al., "Fixing the train-test resolution discrepancy",
NeurIPS 2019), so a lower training resolution costs less accuracy than its token count
suggests. The Hugging Face ViT / DeiT forward interpolates the position embeddings when asked
(`interpolate_pos_encoding=True`); nothing is added to the model, so the saved adapter, the
merged model and every export are those of a run at full size, and validation, thresholds,
calibration and prediction all run at the model's own size.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .errors import VitloraError


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model under peft's and DDP's wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def training_size(model: nn.Module, size: int | None, pp: Any) -> tuple[int, int] | None:
    """(h, w) of the training crops, or None when they are the model's own input size.

    Refused with one sentence where the model cannot take another size: a forward without
    `interpolate_pos_encoding`, or a side that is not a multiple of the patch size.
    """
    if size is None or (size, size) == (pp.height, pp.width):
        return None
    base = base_of(model)
    if "interpolate_pos_encoding" not in inspect.signature(base.forward).parameters:
        raise VitloraError(f"--train-size needs a ViT / DeiT-style model; {type(base).__name__} "
                           "cannot interpolate its position embeddings")
    patch = getattr(base.config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if isinstance(patch, int) and size % patch:
        raise VitloraError(f"--train-size must be a multiple of the patch size {patch}, not {size}")
    return size, size


def forward_kwargs(size: tuple[int, int] | None) -> dict[str, Any]:
    """Extra keyword arguments of a training forward at `size`."""
    return {} if size is None else {"interpolate_pos_encoding": True}
