#!/usr/bin/env python
"""Several classes added at once with positives only (extend mode): PatchDropout's default scope.

The four cat breeds of `quality.py`'s stacking sequence (150 training photos each, the same seeded
split) added to DeiT-tiny in one `vitlora train DIR --mode extend` run, no negatives, once per
variant; each run is scored on the 45 held-out photos per breed and on the 500 labelled ImageNet
photos (top-1, and the share answered with one of the new breeds).

    python benchmarks/extend_several.py --workdir /tmp/several --out several.json
    python benchmarks/extend_several.py --variants all-tokens:--patch-keep,1 keep0.5:--patch-keep,0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["keep0.5:--patch-keep,0.5", "all-tokens:--patch-keep,1"],
                    help="NAME:FLAG,VALUE,... (extra `vitlora train` arguments, comma-separated)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/vitlora-extend-several")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    split = q.stack_breed_split(a.seed)
    data = work / "breeds"
    for breed, (train, _) in split.items():
        q.link_folder(data / breed, train)
    tests = {b: test for b, (_, test) in split.items()}
    inet = q.imagenet_labels()
    rows = []
    for variant in a.variants:
        name, _, flags = variant.partition(":")
        run = work / f"run-{name}"
        q.cli(["train", str(data), "--mode", "extend", "--model", str(q.MODEL), "--out", str(run), "--seed",
               str(a.seed), "--overwrite"] + [f for f in flags.split(",") if f], work / f"{name}-train.log")
        row = {"run": name, **q.label_recalls(run, tests, work, name)}
        p_in = q.predict(run, sorted(inet), work, f"{name}-inet")
        row["imagenet_top1"] = float(np.mean([q.top1(r)[0] == inet[k] for k, r in p_in.items()]))
        row["imagenet_taken_by_new"] = float(np.mean([q.top1(r)[0] in tests for r in p_in.values()]))
        row["n_imagenet"] = len(p_in)
        m = json.loads((run / "metrics.json").read_text())
        row["train_images_per_s"] = m["mean_images_per_s"]
        rows.append(row)
        recalls = " / ".join(f"{row[f'recall_{b}']:.3f}" for b in tests)
        print(f"{name}: recall {recalls}, ImageNet top-1 {row['imagenet_top1']:.3f}, taken by a new breed "
              f"{row['imagenet_taken_by_new']:.3f}, {row['train_images_per_s']:.1f} training img/s", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
