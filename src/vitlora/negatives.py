"""Negative photos for extend mode, made from images that ship inside PyPI packages.

Extend mode learns where a new class *ends* from photos of other things (`--negatives`).
Anyone can make a starter set offline with::

    python -m vitlora.negatives OUT_DIR [--per-image N] [--seed S] [--split train|test|all]

Sources (no download: the files are inside the installed wheels):

* scikit-image's `skimage.data` sample images that ship with the wheel (BSD-3 licence
  of scikit-image; each image's own licence and origin is listed in `skimage.data`'s
  documentation - mostly public domain / CC0 / NASA / the authors' own photos): photos
  (astronaut, camera, coffee, coins, clock, moon, text, rocket, stereo_motorcycle,
  chelsea the cat), textures (grass, brick, gravel), microscopy and astronomy
  (immunohistochemistry, cell, hubble_deep_field, retina), graphics (page, logo,
  colorwheel, checkerboard, horse silhouette, binary_blobs, shepp_logan_phantom) and the
  `lfw_subset` faces (small greyscale crops from Labeled Faces in the Wild);
* scikit-learn's `load_sample_images()` photos `china.jpg` (a temple) and `flower.jpg`
  (CC-BY 2.0, from Flickr, credited in scikit-learn's docs).

Colour sources stay colour, greyscale ones are written as greyscale JPEGs. Each source
image gives `per_image` files: the whole image first, then random crops (area 15-100 %,
aspect 3:4-4:3, random mirror), each resized to a short side of 256 px, JPEG quality 90.

`split` partitions **by source image** with a fixed table (independent of `seed`), so
test negatives come from images never seen in training: `train` has 15 sources, `test`
13 (the only animal photo, the cat, is on the test side on purpose: the hardest unseen
negative for a furry new class). `seed` only changes the crops.

These are few and far from any real deployment (there is one animal among them), so a
model trained with them is only as trustworthy as they are varied: add photos of what
your users will really show the model.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import VitloraError

SPLITS = ("train", "test", "all")
SHORT_SIDE = 256

# name -> split; the order is the order files are written in
SOURCES: dict[str, str] = {
    # train side: 15 source images
    "astronaut": "train", "camera": "train", "coffee": "train", "coins": "train", "china": "train",
    "grass": "train", "brick": "train", "hubble_deep_field": "train", "immunohistochemistry": "train",
    "page": "train", "stereo_motorcycle": "train", "horse": "train", "checkerboard": "train",
    "binary_blobs": "train", "retina": "train",
    # test side: 13 source images
    "chelsea": "test", "rocket": "test", "clock": "test", "flower": "test", "gravel": "test",
    "moon": "test", "text": "test", "colorwheel": "test", "logo": "test", "cell": "test",
    "microaneurysms": "test", "shepp_logan_phantom": "test", "lfw_subset": "test",
}


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return np.clip(a + 0.5, 0, 255).astype(np.uint8)
    return a


def _flatten_alpha(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 4:  # composite on white
        rgb, alpha = a[..., :3].astype(np.float32), a[..., 3:].astype(np.float32) / 255.0
        return (rgb * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return a


def _loader(name: str) -> Callable[[int], np.ndarray]:
    """A function index -> uint8 HxW or HxWx3 array for source `name`."""
    try:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            return lambda i: load_sample_image(f"{name}.jpg")
        from skimage import data
    except ImportError as exc:
        raise VitloraError(
            f"making negatives needs scikit-image and scikit-learn ({exc.name} is missing): "
            "pip install scikit-image scikit-learn"
        ) from None
    if name == "chelsea":
        return lambda i: data.chelsea()
    if name == "stereo_motorcycle":
        return lambda i: data.stereo_motorcycle()[0]
    if name == "lfw_subset":
        faces = data.lfw_subset()  # 200 small faces: one per crop instead of crops of one
        return lambda i: faces[i % len(faces)]
    if name == "binary_blobs":  # generated: fix its seed so the source image is always the same
        return lambda i: data.binary_blobs(rng=0)
    fn = getattr(data, name)
    return lambda i: fn()


def _crop(img: Image.Image, rng: np.random.Generator, whole: bool) -> Image.Image:
    w, h = img.size
    if not whole:
        for _ in range(10):
            area = w * h * rng.uniform(0.15, 1.0)
            aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            cw, ch = round(float(np.sqrt(area * aspect))), round(float(np.sqrt(area / aspect)))
            if 8 <= cw <= w and 8 <= ch <= h:
                left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                img = img.crop((left, top, left + cw, top + ch))
                break
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    w, h = img.size
    scale = SHORT_SIDE / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def source_names(split: str = "all") -> list[str]:
    if split not in SPLITS:
        raise VitloraError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    return [n for n, s in SOURCES.items() if split == "all" or s == split]


def make_negatives(out_dir: str | Path, split: str = "all", per_image: int = 12, seed: int = 0,
                   sources: list[str] | None = None) -> list[Path]:
    """Write `per_image` JPEGs per source image of `split` under OUT_DIR/<source>/; return their paths.

    `sources` narrows `split` to those source names. Deterministic for a given (source,
    per_image, seed); files already there are overwritten.
    """
    if per_image < 1:
        raise VitloraError("--per-image must be at least 1")
    names = source_names(split)
    if sources is not None:
        unknown = sorted(set(sources) - set(SOURCES))
        if unknown:
            raise VitloraError(f"unknown source image(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
        names = [n for n in names if n in sources]
    out = Path(out_dir)
    paths: list[Path] = []
    for name in names:
        load = _loader(name)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        whole = None
        for i in range(per_image):
            if whole is None or name == "lfw_subset":  # one image per source, except the faces
                arr = _flatten_alpha(_to_uint8(np.asarray(load(i))))
                whole = Image.fromarray(arr).convert("RGB" if arr.ndim == 3 else "L")
            img = whole
            crop = _crop(img, rng, whole=(i == 0))
            path = folder / f"{name}-{i:03d}.jpg"
            crop.save(path, format="JPEG", quality=90)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vitlora.negatives",
        description="Write negative photos (for vitlora train --negatives) made from the sample images that "
                    "ship with scikit-image and scikit-learn.")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--per-image", type=int, default=12, dest="per_image",
                   help="files per source image: the whole image plus random crops (default 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops (default 0)")
    p.add_argument("--split", choices=SPLITS, default="all",
                   help="which source images: train, test (disjoint sets of images) or all (default)")
    args = p.parse_args(argv)
    try:
        paths = make_negatives(args.out_dir, args.split, args.per_image, args.seed)
    except VitloraError as exc:
        print(f"vitlora.negatives: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {len(paths)} negative photos from {len(source_names(args.split))} source images "
          f"({args.split}) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
