"""Training-recipe pieces the loop plugs in: an EMA of the weights, class weights, balanced sampling.

Each is off by default and small enough to read in one go; `vitlora.loop` decides when to
call them (`--ema`, `--class-weights auto`, `--balanced-sampler`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class Ema:
    """Exponential moving average of a model's trainable weights, updated in place after each optimizer step.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)``): a fine-tune of a few hundred steps would
    otherwise average mostly the starting weights. Only trainable tensors are averaged (the
    adapter and the head), so it costs a copy of those, not of the model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.updates = float(decay), 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block (to evaluate or save them), the raw ones after."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)


def inverse_frequency_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class loss weights ``n / (K * n_c)`` over the K classes present: every image's mean weight is 1.

    Classes absent from the training data get weight 1 (they never occur as a target).
    """
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes).double()
    present = counts > 0
    weights = torch.ones(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (int(present.sum()) * counts[present])
    return weights.float()


def balanced_batches(labels: torch.Tensor, batch_size: int, generator: torch.Generator, rank: int = 0,
                     world_size: int = 1) -> list[torch.Tensor]:
    """One epoch of index batches drawn with replacement, each class equally likely (this rank's share).

    As many draws as images; every rank draws the same sequence from a generator in the same
    state and takes positions ``rank, rank + world_size, ...`` (padded by wrapping, as
    `vitlora.data.iterate_batches` does), so all ranks run the same number of batches.
    """
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1).double()
    draw = counts[labels].reciprocal()
    order = torch.multinomial(draw, len(labels), replacement=True, generator=generator)
    total = -(-len(order) // world_size) * world_size
    order = torch.cat([order, order[: total - len(order)]])[rank::world_size]
    return list(order.split(batch_size))
