#!/usr/bin/env python
"""Build the two-class ImageFolder used to run ``reference_guide.py`` (and vitlora's
new-head mode) without network access.

Layout written under ``OUT`` (default ``/tmp/vitlora_guide_data``)::

    OUT/raccoon/raccoon-*.jpg   copies of every JPEG in --raccoon (the shared 150 raccoon photos)
    OUT/other/other-NNN.jpg     --n-other (default 150) random crops of scikit-image sample photos

"other" crops: sources are the scikit-image sample images that ship inside the wheel
(no download): astronaut, chelsea (a cat), coffee, rocket, hubble_deep_field,
immunohistochemistry, retina, colorwheel, stereo_motorcycle (left view) in colour, and
camera, coins, grass, gravel, brick, moon, page, text, clock, cell in greyscale (converted to
RGB). Crop ``i`` uses source ``i % n_sources``; with ``random.Random(--seed)`` it draws a
square-ish box whose side is 35-100 % of the source's shorter side (aspect 3/4..4/3, clipped to
the image), at a uniform position, flips it horizontally with p=0.5, resizes it so the shorter
side is 256 px (bicubic) and saves JPEG quality 90. Same seed -> byte-identical folder.

Usage: ``python benchmarks/make_guide_data.py [--out DIR] [--n-other 150] [--seed 0]``.
"""

import argparse
import os
import random
import shutil
import sys

DEFAULT_RACCOON = "/work/shared/data/raccoon"
DEFAULT_OUT = "/tmp/vitlora_guide_data"
COLOUR = [
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "stereo_motorcycle",
]
GREY = ["camera", "coins", "grass", "gravel", "brick", "moon", "page", "text", "clock", "cell"]


def _sources():
    import numpy as np
    import skimage.data as data
    from PIL import Image

    images = []
    for name in COLOUR + GREY:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            arr = fn()
        except Exception:  # some builds need a download for a few samples; skip those
            continue
        if isinstance(arr, tuple):  # stereo_motorcycle -> (left, right, disparity)
            arr = arr[0]
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            arr = (arr.astype("float32") * (255.0 / max(float(arr.max()), 1.0))).astype("uint8")
        img = Image.fromarray(arr)
        images.append((name, img.convert("RGB")))
    if not images:
        raise SystemExit("no scikit-image sample images available")
    return images


def build(out: str, raccoon: str = DEFAULT_RACCOON, n_other: int = 150, seed: int = 0) -> dict:
    from PIL import Image

    rng = random.Random(seed)
    rdir = os.path.join(out, "raccoon")
    odir = os.path.join(out, "other")
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(rdir)
    os.makedirs(odir)
    n_rac = 0
    for f in sorted(os.listdir(raccoon)):
        if f.lower().endswith((".jpg", ".jpeg")):
            shutil.copyfile(os.path.join(raccoon, f), os.path.join(rdir, f))
            n_rac += 1
    sources = _sources()
    for i in range(n_other):
        name, img = sources[i % len(sources)]
        w, h = img.size
        short = min(w, h)
        side = rng.uniform(0.35, 1.0) * short
        aspect = rng.uniform(3 / 4, 4 / 3)
        cw = max(16, min(w, int(round(side * aspect ** 0.5))))
        ch = max(16, min(h, int(round(side / aspect ** 0.5))))
        x = rng.randint(0, w - cw)
        y = rng.randint(0, h - ch)
        crop = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = 256 / min(cw, ch)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
        crop.save(os.path.join(odir, f"other-{i:03d}.jpg"), quality=90)
    return {"out": out, "raccoon": n_rac, "other": n_other, "sources": [n for n, _ in sources]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--raccoon", default=DEFAULT_RACCOON)
    ap.add_argument("--n-other", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    info = build(args.out, args.raccoon, args.n_other, args.seed)
    print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
