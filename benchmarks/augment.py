#!/usr/bin/env python
"""Hand-written grid_sample random-resized-crop + flip vs kornia's, at equal output.

Issue 13 asks to replace ``transforms.random_resized_crop_flip`` with kornia "unless a benchmark
shows the hand-written one measurably faster at equal output". Both sides take the training cache's
uint8 [B,3,S,S] batch and return normalised float32 [B,3,H,W]:

* ``hand``: ``vitlora.data.transforms.random_resized_crop_flip`` (one affine ``grid_sample``, fused
  normalise);
* ``kornia-slice`` / ``kornia-resample``: ``K.RandomResizedCrop(align_corners=False)`` in each cropping
  mode + ``K.RandomHorizontalFlip`` + ``K.Normalize`` on the batch converted to [0, 1] floats;
* ``Augment ...``: what the other policies and options of ``vitlora.data.augment.Augment`` add on top.

Equal output is checked first: kornia's own crop boxes are fed to the hand-written map and the two
images compared (max abs difference in normalised units). Variants then run round-robin, ``--repeats``
times after a warm-up; the median per batch is printed, in wall-clock and in CPU time of this process
(the steadier figure on a machine others are using), with its ratio to ``hand``.

Example::

    python benchmarks/augment.py --batch 32 --work 256 --size 224 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import kornia.augmentation as K
import torch

from _cpu import cpu_line

from vitlora.data.augment import Augment
from vitlora.data.transforms import Preprocess, crop_resize, random_resized_crop_flip


def kornia_pipeline(size: int, pp: Preprocess, mode: str) -> K.AugmentationSequential:
    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.25, 1.0), align_corners=False, cropping_mode=mode),
        K.RandomHorizontalFlip(),
        K.Normalize(mean=torch.tensor(pp.mean), std=torch.tensor(pp.std)),
    )


def equal_output_gap(x: torch.Tensor, size: int, pp: Preprocess, mode: str) -> tuple[float, float]:
    """Max |kornia - hand| (normalised units) when both crop kornia's boxes, no flip: (interior, edge rows/cols).

    Where a crop is upsampled, the outermost output pixels sample half a pixel beyond the box: kornia
    (``F.interpolate`` on the cropped tensor) clamps to the box, the hand-written map reads the real
    neighbouring pixel of the working copy. The interior must agree to float rounding.
    """
    rrc = K.RandomResizedCrop((size, size), scale=(0.25, 1.0), align_corners=False, cropping_mode=mode)
    xf = x.float() / 255
    params = rrc.forward_parameters(xf.shape)
    ko = rrc(xf, params=params) * 255
    src = params["src"]
    left, top = src[:, 0, 0], src[:, 0, 1]
    boxes = (top, left, src[:, 2, 1] - top + 1, src[:, 1, 0] - left + 1)
    hand = crop_resize(x, boxes, torch.zeros(len(x), dtype=torch.bool), (size, size))
    gap = (ko - hand).abs() / 255 / min(pp.std)
    return float(gap[..., 1:-1, 1:-1].max()), float(gap.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--work", type=int, default=256, help="side of the uint8 working copy")
    ap.add_argument("--size", type=int, default=224, help="model input side")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    pp = Preprocess(a.size, a.size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 2)
    x = torch.randint(0, 256, (a.batch, 3, a.work, a.work), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    ks, kr = kornia_pipeline(a.size, pp, "slice"), kornia_pipeline(a.size, pp, "resample")
    variants = {
        "hand": lambda: random_resized_crop_flip(x, pp, generator=gen),
        "kornia-slice": lambda: ks(x.float().div_(255)),
        "kornia-resample": lambda: kr(x.float().div_(255)),
    }
    labels = torch.arange(a.batch) % 10
    for name, settings in {"Augment trivial": dict(policy="trivial"), "Augment randaug": dict(policy="randaugment"),
                           "Augment +erase+mix": dict(policy="randaugment", random_erasing=0.25, mixup=0.8,
                                                      cutmix=1.0)}.items():
        aug = Augment(pp, 10, **settings)
        variants[name] = lambda aug=aug: aug(x, labels, gen)
    print(cpu_line())
    print(f"batch {a.batch} x {a.work}^2 uint8 -> {a.size}^2 normalised float32")
    for mode in ("slice", "resample"):
        inner, edge = equal_output_gap(x, a.size, pp, mode)
        print(f"equal output, kornia-{mode} vs hand on kornia's boxes: max |diff| {inner:.1e} inside, "
              f"{edge:.2f} on the outermost pixel rows/cols (normalised units)")
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():
        f()  # warm-up
    for _ in range(a.repeats):
        for name, f in variants.items():  # round-robin: background load hits all alike
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    w0, c0 = statistics.median(wall["hand"]), statistics.median(cpu["hand"])
    for name in variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:18s} wall {w * 1e3:7.1f} ms/batch ({a.batch / w:6.1f} img/s, {w / w0:4.2f}x hand's time)   "
              f"CPU {c * 1e3:7.1f} ms/batch ({c / c0:4.2f}x hand's)")


if __name__ == "__main__":
    main()
