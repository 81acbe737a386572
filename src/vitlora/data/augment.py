"""Training augmentation: crop + flip, an optional policy, random erasing, mixup / cutmix, on the batch.

The geometric part stays the hand-written batched crop of :mod:`.transforms`
(``benchmarks/augment.py``: it equals kornia's slice-mode ``RandomResizedCrop``
inside the image and runs ~1.5-3.5x faster on CPU); everything else is kornia,
the field's batched augmentation library, applied to the whole batch on the
training device:

* ``policy``: ``basic`` (crop + flip only), ``trivial`` (kornia ``TrivialAugment``)
  or ``randaugment`` (kornia ``RandAugment``, ``num_ops`` ops at ``magnitude``);
  kornia picks the operation once per batch and draws its magnitude per image.
* ``random_erasing``: per-image probability of kornia ``RandomErasing``, applied to
  the normalised batch with value 0 (the dataset mean colour).
* ``mixup`` / ``cutmix``: the Beta(alpha, alpha) concentration of kornia
  ``RandomMixUpV2`` / ``RandomCutMixV2`` (0 = off); with both on, each batch uses one of
  them, chosen with probability 1/2 (timm's ``switch_prob``). Mixed batches come with
  soft targets [B, C] that ``F.cross_entropy`` accepts as they are.

Reproducibility: kornia samples from torch's global generator, so every kornia
call runs under ``torch.random.fork_rng`` seeded from one draw of the caller's
generator; the global state is left as it was and the same seed gives the same batch.
With ``policy="basic"`` and nothing else on, the generator is used exactly as by
``random_resized_crop_flip`` alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..config import AUGMENT_POLICIES as POLICIES
from ..errors import VitloraError
from .transforms import Preprocess, normalize_unit, random_resized_crop_flip


def _check(policy: str, mixup: float, cutmix: float, random_erasing: float) -> None:
    if policy not in POLICIES:
        raise VitloraError(f"unknown augment policy {policy!r}; use one of {', '.join(POLICIES)}")
    if mixup < 0 or cutmix < 0:
        raise VitloraError("--mixup and --cutmix take a Beta concentration alpha >= 0 (0 turns them off)")
    if not 0.0 <= random_erasing <= 1.0:
        raise VitloraError("--random-erasing is a probability and must be in [0, 1]")


def _kornia() -> Any:
    """``kornia.augmentation``, needed for anything beyond crop + flip (the ``augment`` extra)."""
    try:
        import kornia.augmentation as K
    except ImportError:
        raise VitloraError("--augment trivial/randaugment, --mixup, --cutmix and --random-erasing need kornia: "
                           "pip install 'vitlora[augment]'") from None
    return K


def _policy_module(policy: str, num_ops: int, magnitude: int) -> torch.nn.Module | None:
    if policy == "basic":
        return None
    auto = _kornia().auto
    if policy == "trivial":
        return auto.TrivialAugment()
    try:
        return auto.RandAugment(n=num_ops, m=magnitude)
    except ValueError as e:
        raise VitloraError(f"bad RandAugment setting: {e}") from None


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None) -> Iterator[None]:
    """Run kornia's global-RNG sampling from one draw of ``generator``, leaving the global state untouched."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):  # kornia samples its parameters on the CPU
        torch.default_generator.manual_seed(seed)
        yield


def soft_targets(mix: torch.Tensor, num_classes: int, cut: bool) -> torch.Tensor:
    """kornia's mix labels (label, paired label, lambda) -> class probabilities [B, C].

    ``RandomMixUpV2``'s lambda is the weight of the paired image; ``RandomCutMixV2``'s
    (``use_correct_lambda=True``) the area kept from the image itself.
    """
    y1, y2, lam = mix[:, 0].long(), mix[:, 1].long(), mix[:, 2].float().unsqueeze(1)
    own = lam if cut else 1 - lam
    return own * F.one_hot(y1, num_classes).float() + (1 - own) * F.one_hot(y2, num_classes).float()


class Augment:
    """Batched training augmentation built from the run's settings (see the module docstring)."""

    def __init__(
        self,
        pp: Preprocess,
        num_classes: int,
        policy: str = "basic",
        mixup: float = 0.0,
        cutmix: float = 0.0,
        random_erasing: float = 0.0,
        scale_min: float = 0.25,
        num_ops: int = 2,
        magnitude: int = 9,
        size: tuple[int, int] | None = None,
    ) -> None:
        _check(policy, mixup, cutmix, random_erasing)
        self.pp, self.num_classes, self.policy, self.scale_min = pp, int(num_classes), policy, scale_min
        self.size = size  # training crop side (--train-size); None: the model's input size
        self.mixup, self.cutmix = float(mixup), float(cutmix)
        self._policy = _policy_module(policy, num_ops, magnitude)
        self._erase = self._mixer = self._cutter = None
        if random_erasing > 0 or mixup > 0 or cutmix > 0:
            K = _kornia()
            if random_erasing > 0:
                self._erase = K.RandomErasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value=0.0, p=random_erasing)
            if mixup > 0:
                self._mixer = K.RandomMixUpV2(data_keys=["input", "class"])
            if cutmix > 0:
                self._cutter = K.RandomCutMixV2(beta=cutmix, use_correct_lambda=True, data_keys=["input", "class"])

    @property
    def mixes(self) -> bool:
        """True when batches come with soft targets (mixup or cutmix on)."""
        return self._mixer is not None or self._cutter is not None

    @property
    def uses_kornia(self) -> bool:
        return self._policy is not None or self._erase is not None or self.mixes

    def images(
        self, batch: torch.Tensor, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """uint8 [B,3,S,S] -> augmented, normalised float [B,3,H,W] (no label mixing)."""
        with self._kornia_rng(generator):
            return self._images(batch, generator).to(dtype)

    def __call__(
        self,
        batch: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batch + integer labels -> (pixel_values, targets).

        ``targets`` are the integer labels, or soft targets [B, C] (float32, rows sum to 1)
        when mixup / cutmix is on; ``F.cross_entropy(logits, targets)`` takes either.
        """
        with self._kornia_rng(generator):
            x = self._images(batch, generator)
            if not self.mixes:
                return x.to(dtype), labels
            x, targets = self._mix(x, labels)
            return x.to(dtype), targets

    def _kornia_rng(self, generator: torch.Generator | None) -> contextlib.AbstractContextManager[None]:
        return _seeded(generator) if self.uses_kornia else contextlib.nullcontext()

    def _images(self, batch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        scale = (self.scale_min, 1.0)
        if self._policy is None:
            x = random_resized_crop_flip(batch, self.pp, scale=scale, generator=generator, size=self.size)
        else:  # kornia's photometric ops expect [0, 1] pixels: normalise after them
            x01 = random_resized_crop_flip(batch, self.pp, scale=scale, generator=generator, unit_range=True,
                                           size=self.size)
            x = normalize_unit(self._policy(x01).clamp_(0, 1), self.pp)
        return self._erase(x) if self._erase is not None else x

    def _mix(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cut = self._cutter is not None and (self._mixer is None or bool(torch.rand(()) < 0.5))
        if cut:
            x, mix = self._cutter(x, labels)
            mix = mix[0]  # one cut per image: (num_mix=1, B, 3)
        else:  # kornia draws mixup's lambda uniformly; the usual recipe draws Beta(alpha, alpha)
            params = self._mixer.forward_parameters(x.shape)
            params["mixup_lambdas"] = torch.distributions.Beta(self.mixup, self.mixup).sample((len(x),))
            x, mix = self._mixer(x, labels, params=params)
        return x, soft_targets(mix.to(labels.device), self.num_classes, cut)
