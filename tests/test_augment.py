"""Batched training augmentation (vitlora.data.augment): policies, erasing, mixup / cutmix, seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitlora.data.augment import POLICIES, Augment
from vitlora.data.transforms import Preprocess, random_resized_crop_flip
from vitlora.errors import VitloraError

PP = Preprocess(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 2)
LO, HI = -1.0, 1.0  # normalised range of [0, 255] pixels with mean = std = 0.5


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 37, 37), dtype=torch.uint8, generator=g), torch.arange(n) % 3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", POLICIES)
def test_shapes_dtypes_range_and_labels_untouched(policy: str) -> None:
    x, y = _batch()
    aug = Augment(PP, 3, policy=policy, random_erasing=0.5)
    out, targets = aug(x, y, _gen())
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= LO - 1e-5 and out.max() <= HI + 1e-5
    assert torch.equal(targets, y)  # no mixing: integer labels as given
    assert aug(x, y, _gen(), dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    assert aug.images(x, _gen()).shape == (8, 3, 32, 32)


@pytest.mark.parametrize("settings", [dict(policy="basic"), dict(policy="trivial", mixup=0.4),
                                      dict(policy="randaugment", cutmix=1.0, random_erasing=0.5),
                                      dict(mixup=0.8, cutmix=1.0)])
def test_same_seed_same_batch_and_global_rng_untouched(settings: dict) -> None:
    x, y = _batch()
    aug = Augment(PP, 3, **settings)
    state = torch.get_rng_state()
    a, b, c = aug(x, y, _gen(5)), aug(x, y, _gen(5)), aug(x, y, _gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(torch.get_rng_state(), state)  # kornia drew from a forked, seeded generator


def test_basic_is_todays_crop_and_flip() -> None:
    """Nothing on but the crop: the same pixels and generator use as random_resized_crop_flip alone."""
    x, y = _batch()
    g1, g2 = _gen(2), _gen(2)
    out, _ = Augment(PP, 3, scale_min=0.5)(x, y, g1)
    assert torch.equal(out, random_resized_crop_flip(x, PP, scale=(0.5, 1.0), generator=g2))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_policies_change_pixels_beyond_the_crop() -> None:
    x, y = _batch(16)
    basic = Augment(PP, 3).images(x, _gen(1))
    for policy in ("trivial", "randaugment"):
        changed = [not torch.allclose(Augment(PP, 3, policy=policy).images(x, _gen(s)), basic, atol=1e-3)
                   for s in range(4)]
        assert any(changed)


def test_random_erasing_probability_one_and_zero() -> None:
    x, y = _batch()
    base = Augment(PP, 3).images(x, _gen(0))
    never = Augment(PP, 3, random_erasing=0.0).images(x, _gen(0))
    always = Augment(PP, 3, random_erasing=1.0).images(x, _gen(0))
    assert torch.equal(never, base)
    erased = (always == 0).all(dim=1)  # value 0 = the mean colour, all channels
    assert erased.flatten(1).any(dim=1).all()  # every image has an erased box
    assert (always != base).flatten(1).any(dim=1).all()


@pytest.mark.parametrize("settings", [dict(mixup=0.4), dict(cutmix=1.0), dict(mixup=1.0, cutmix=1.0)])
def test_mixed_targets_are_probabilities_matching_the_pixels(settings: dict) -> None:
    n, classes = 8, 8
    x = torch.stack([torch.full((3, 37, 37), 30 * i, dtype=torch.uint8) for i in range(n)])
    y = torch.arange(n)  # image i is flat grey level 30*i and has class i
    out, t = Augment(PP, classes, **settings)(x, y, _gen(3))
    assert t.shape == (n, classes) and t.dtype == torch.float32
    assert torch.allclose(t.sum(1), torch.ones(n)) and (t >= 0).all()
    # each pixel is a mix of flat images; its mean level over the image gives the label weights back
    level = ((out[:, 0] * 0.5 + 0.5) * 255 / 30).mean(dim=(1, 2))
    assert torch.allclose(level, (t * torch.arange(classes)).sum(1), atol=0.02)
    loss = F.cross_entropy(torch.zeros(n, classes, requires_grad=True), t)  # the loop's loss takes them as-is
    assert torch.isfinite(loss)


def test_bad_settings_are_one_line_user_errors() -> None:
    with pytest.raises(VitloraError, match="unknown augment policy 'autoaugment'; use one of basic, trivial"):
        Augment(PP, 3, policy="autoaugment")
    with pytest.raises(VitloraError, match="--mixup"):
        Augment(PP, 3, mixup=-1)
    with pytest.raises(VitloraError, match="--random-erasing"):
        Augment(PP, 3, random_erasing=1.5)
    with pytest.raises(VitloraError, match="RandAugment"):
        Augment(PP, 3, policy="randaugment", magnitude=40)
    assert not Augment(PP, 3).mixes and Augment(PP, 3, cutmix=0.5).mixes


def test_kornia_is_needed_only_beyond_crop_and_flip(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "kornia.augmentation", None)  # import fails as if not installed
    x, y = _batch()
    assert Augment(PP, 3)(x, y, _gen())[0].shape == (8, 3, 32, 32)
    with pytest.raises(VitloraError, match=r"need kornia: pip install 'vitlora\[augment\]'"):
        Augment(PP, 3, policy="trivial")
    with pytest.raises(VitloraError, match="need kornia"):
        Augment(PP, 3, mixup=0.2)
