"""Batched inference over a decoded image cache: the one loop behind eval, validation, extend and negatives."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .runtime import autocast


def batched_logits(cache: Any, forward: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """`forward(uint8 images [b, 3, H, W]) -> logits` over every image of `cache` in order: float32 CPU [N, C]."""
    outs = []
    with torch.no_grad():  # not inference_mode: extend's features feed a trained probe later
        for start in range(0, len(cache), batch_size):
            images, _ = cache.batch(torch.arange(start, min(start + batch_size, len(cache))))
            outs.append(forward(images).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block, back in the mode it was in after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def cache_logits(model: nn.Module, cache: Any, pp: Any, device: torch.device, precision: str = "fp32",
                 batch_size: int = 64) -> torch.Tensor:
    """Logits [N, C] (float32, CPU) of `model` for every image of an eval cache (normalised, eval mode)."""
    from .data import normalize

    def forward(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return model(pixel_values=normalize(images.to(device, non_blocking=True), pp)).logits

    with eval_mode(model):
        return batched_logits(cache, forward, batch_size)
