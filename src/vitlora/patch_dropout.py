"""PatchDropout (Liu et al., WACV 2023): train on a random subset of each image's patch tokens.

A ViT's cost grows with its sequence length, and fine-tuning loses little when
a random part of the patch tokens is left out of each training image (timm's
``patch_drop_rate``). Here it is a forward hook on the Hugging Face ViT / DeiT
embeddings module, so:

* the position embeddings are already added when tokens are dropped (each kept
  token still knows where it came from);
* the CLS token (and DeiT's distillation token) is always kept, in front;
* it acts only while the embeddings module is in training mode and the hook is
  enabled: ``model.eval()`` evaluates and predicts on all tokens, bit for bit as
  without it;
* it adds no parameter or buffer, so the state dict, the saved adapter and the
  merged model are exactly those of a run without it (they reload with plain
  peft / transformers); it works the same on a bare model or under peft's wrapping.

Each image keeps ``max(1, floor(keep * N))`` of its ``N`` patch tokens (timm's
rounding), chosen uniformly without replacement and kept in their original order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import VitloraError


def _embeddings_classes() -> tuple[type[nn.Module], ...]:
    from transformers.models.deit.modeling_deit import DeiTEmbeddings
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    return ViTEmbeddings, DeiTEmbeddings


def _embeddings(model: nn.Module) -> list[nn.Module]:
    classes = _embeddings_classes()
    return [m for m in model.modules() if isinstance(m, classes)]


def find_embeddings(model: nn.Module) -> nn.Module:
    """The ViT / DeiT embeddings module inside ``model`` (bare, wrapped by peft or DDP)."""
    found = _embeddings(model)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise VitloraError(
            f"patch dropout needs a ViT or DeiT model with one embeddings module; {type(model).__name__} has {what}"
        )
    return found[0]


def kept_tokens(num_patches: int, keep: float) -> int:
    """Patch tokens each training image keeps: ``max(1, floor(keep * num_patches))``."""
    return max(1, int(keep * num_patches))


AUTO_KEEP = 0.5  # the default in a first extension of one class without negatives (see `training_keep`)


def has_embeddings(model: nn.Module) -> bool:
    """Whether ``model`` has the one ViT / DeiT embeddings module PatchDropout hooks."""
    return len(_embeddings(model)) == 1


def training_keep(model: nn.Module, keep: float | None, first_extension: bool) -> float:
    """The fraction of patch tokens each training image keeps: ``keep``, or the default when None.

    The default is `AUTO_KEEP` for a `first_extension` (extend mode adding one class, no negative
    images in the batches, not stacked on an extended run) of a ViT / DeiT, else 1.0 (off). Measured
    on 5 raccoon folds with positives only, 160-px crops (`benchmarks/sweep.py extend`): recall 0.960
    at keep 0.5 and at 1.0 (every fold alike), false positives 0.043 vs 0.045 of 400 fresh cats and
    dogs, retention 0.951 vs 0.953, ImageNet top-1 0.799 both, while a training image costs about
    half. Not the default elsewhere: replace mode lost 2.5 points on the cat breeds at keep 0.5; with
    negatives retention fell on every raccoon fold (0.994 -> 0.988); four cat breeds added at once
    (`benchmarks/extend_several.py`, two seeds) showed no clear difference, but no equality either
    (ImageNet top-1 0.670 -> 0.648 on one seed, 0.740 -> 0.746 on the other).
    """
    if keep is not None:
        return keep
    return AUTO_KEEP if first_extension and has_embeddings(model) else 1.0


class PatchDropout:
    """Keep a random ``keep`` fraction of the patch tokens of each training image.

    ``attach(model)`` registers the hook; ``enabled`` switches it without
    detaching; ``detach()`` removes it. ``generator`` (optional) makes the
    choice of tokens reproducible; without one torch's global generator is used.
    """

    def __init__(self, keep: float, generator: torch.Generator | None = None) -> None:
        if not 0.0 < keep <= 1.0:
            raise VitloraError(f"--patch-keep must be in (0, 1], not {keep}")
        self.keep, self.generator, self.enabled = float(keep), generator, True
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._prefix = 1

    def attach(self, model: nn.Module) -> PatchDropout:
        """Hook the embeddings of ``model``; a no-op hook is not even registered at ``keep == 1``."""
        self.detach()
        emb = find_embeddings(model)
        self._prefix = 2 if getattr(emb, "distillation_token", None) is not None else 1
        if self.keep < 1.0:
            self._handle = emb.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not (self.enabled and module.training):
            return None  # evaluation / prediction: all tokens, output untouched
        return self.select(output)

    def select(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, prefix + N, D] -> [B, prefix + kept_tokens(N), D]: the special tokens, then a random subset."""
        b, n = tokens.shape[0], tokens.shape[1] - self._prefix
        k = kept_tokens(n, self.keep)
        if k >= n:
            return tokens
        g = self.generator
        noise = torch.rand(b, n, generator=g, device=g.device if g is not None else tokens.device)
        idx = noise.argsort(dim=1)[:, :k].sort(dim=1).values.to(tokens.device) + self._prefix
        kept = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return torch.cat([tokens[:, : self._prefix], kept], dim=1)
