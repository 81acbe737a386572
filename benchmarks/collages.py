#!/usr/bin/env python
"""Two-photo collages (raccoon / cat / dog) with multi-label CSV manifests, for vitlora's multi-label goal.

Each collage is a square ``SIZE x SIZE`` JPEG (quality 90): the left half is one photo, the
right half another, each centre-cropped to at most 2:3 (width:height) and resized (bicubic)
into its ``SIZE/2 x SIZE`` half. Its label set is the classes of the two photos
(``raccoon|cat``; two photos of one class give one label), written to a CSV manifest
``path,label`` with paths relative to ``OUT``.

No photo is shared between parts: every class's photos are shuffled with
``random.Random(seed)`` and cut into train / val / test parts (``--fractions``, default
0.6 / 0.15 / 0.25), and each part's collages use only that part's photos, so the test
collages are made of photos never seen in training (nor in threshold tuning).
For each collage, the two classes are drawn uniformly with replacement, then two different
photos of those classes from the part. Same arguments -> byte-identical output.

Layout::

    OUT/train/0000.jpg ...  OUT/train.csv
    OUT/val/0000.jpg ...    OUT/val.csv
    OUT/test/0000.jpg ...   OUT/test.csv

Usage (the multi-label benchmark; DeiT-tiny, CPU)::

    python benchmarks/collages.py --out /tmp/collages
    vitlora train /tmp/collages/train.csv --val /tmp/collages/val.csv \\
        --model ../shared/models/deit-tiny-patch16-224 --epochs 3 --out /tmp/collages-run
    vitlora eval /tmp/collages-run /tmp/collages/test.csv --json /tmp/collages-eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from PIL import Image, ImageOps

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLASSES = {"raccoon": SHARED / "raccoon", "cat": SHARED / "pets-negatives" / "cat",
           "dog": SHARED / "pets-negatives" / "dog"}
EXTENSIONS = (".jpg", ".jpeg", ".png")


def photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)


def split_photos(folders: dict[str, Path], fractions: tuple[float, float, float],
                 seed: int) -> dict[str, dict[str, list[Path]]]:
    """part -> class -> photos; each class's photos shuffled and cut by `fractions` (disjoint parts)."""
    parts: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}, "test": {}}
    rng = random.Random(seed)
    for name, folder in folders.items():
        files = photos(folder)
        rng.shuffle(files)
        a = round(fractions[0] * len(files))
        b = a + round(fractions[1] * len(files))
        for part, chunk in zip(parts, (files[:a], files[a:b], files[b:])):
            if len(chunk) < 2:
                raise SystemExit(f"{folder}: too few photos for the {part} part ({len(chunk)})")
            parts[part][name] = chunk
    return parts


def half(photo: Path, size: int) -> Image.Image:
    """The photo centre-cropped to at most 2:3 (width:height), resized into a size/2 x size half."""
    with Image.open(photo) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        if w / h > 2 / 3:
            keep = round(h * 2 / 3)
            im = im.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
        return im.resize((size // 2, size), Image.BICUBIC)


def collage(left: Path, right: Path, size: int) -> Image.Image:
    canvas = Image.new("RGB", (size, size))
    canvas.paste(half(left, size), (0, 0))
    canvas.paste(half(right, size), (size // 2, 0))
    return canvas


def make_part(out: Path, part: str, pool: dict[str, list[Path]], n: int, size: int, seed: int) -> list[str]:
    """`n` collages of `pool`'s photos into OUT/part/, and their manifest rows."""
    rng = random.Random(f"{seed}-{part}")
    (out / part).mkdir(parents=True, exist_ok=True)
    names = sorted(pool)
    rows = []
    for i in range(n):
        a, b = rng.choice(names), rng.choice(names)
        left = rng.choice(pool[a])
        right = rng.choice([p for p in pool[b] if p != left])
        rel = f"{part}/{i:04d}.jpg"
        collage(left, right, size).save(out / rel, quality=90)
        rows.append(f"{rel},{'|'.join(sorted({a, b}))}")
    (out / f"{part}.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return rows


def make(out: str | os.PathLike, n_train: int = 450, n_val: int = 90, n_test: int = 180, size: int = 224,
         seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)) -> dict:
    """Write the three parts; returns how many photos and collages each part has."""
    out = Path(out)
    parts = split_photos(CLASSES, fractions, seed)
    summary = {}
    for part, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        make_part(out, part, parts[part], n, size, seed)
        summary[part] = {"collages": n, "photos": {c: len(v) for c, v in parts[part].items()}}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/collages")
    ap.add_argument("--n-train", type=int, default=450)
    ap.add_argument("--n-val", type=int, default=90)
    ap.add_argument("--n-test", type=int, default=180)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fractions", type=float, nargs=3, default=(0.6, 0.15, 0.25), metavar=("TRAIN", "VAL", "TEST"))
    a = ap.parse_args()
    print(json.dumps(make(a.out, a.n_train, a.n_val, a.n_test, a.size, a.seed, tuple(a.fractions)), indent=1))


if __name__ == "__main__":
    main()
