#!/usr/bin/env python
"""`--train-size`: replace-mode training speed at the model's size and at the default, side by side.

Runs ``vitlora train`` (the CLI, as a user does) on one seeded 80 % split of the shared cat breeds
(`quality.breeds_split`) with ``--train-size 0`` (224 px, every patch token) and with the default
(160 px in replace mode), plus ``ceiling.py``'s bare dense LoRA step, round-robin for ``--rounds``
rounds so background load hits them alike. Prints the medians: training images/s (mean of the
epochs' ``images_per_s`` in ``metrics.json``, validation excluded), wall seconds (process start to
saved run), the ratio of the two runs, and each run's rate over the bare dense step at the same
precision (issue 12's "≥ 1.5× the bare dense step"). Accuracy is not measured here: it comes from
``sweep.py replace --variants default ts224:train_size=0`` on 5 seeds (README).

    python benchmarks/train_size.py --rounds 3 --epochs 2 --out benchmarks/results/cpu-train-size-DATE.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
from _cpu import cpu_line  # noqa: E402

HERE = Path(__file__).resolve().parent


def train_once(data: Path, out: Path, epochs: int, flags: list[str]) -> dict[str, float]:
    t0 = time.perf_counter()
    subprocess.run(q.VITLORA + ["train", str(data), "--model", str(q.MODEL), "--out", str(out), "--epochs",
                                str(epochs), "--auto-stop", "0", "--overwrite", "--quiet"] + flags,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1"))
    wall = time.perf_counter() - t0
    hist = json.loads((out / "metrics.json").read_text())["epochs"]
    return {"images_per_s": statistics.mean(e["images_per_s"] for e in hist), "wall_s": wall}


def ceiling_once() -> dict[str, float]:
    r = subprocess.run([sys.executable, str(HERE / "ceiling.py"), "--model", str(q.MODEL)], check=True,
                       capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the markdown here")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vitlora-train-size-"))
    train_items, _ = q.breeds_split(a.seed)
    data = work / "train"
    for y in sorted({y for _, y in train_items}):
        q.link_folder(data / y, [f for f, c in train_items if c == y])
    variants = {"--train-size 0 (224 px)": ["--train-size", "0"], "default (160 px)": []}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    ceilings: list[dict[str, float]] = []
    for r in range(a.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            runs[name].append(train_once(data, work / "run", a.epochs, variants[name]))
            print(name, runs[name][-1], flush=True)
        ceilings.append(ceiling_once())
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("images_per_s", "wall_s")} for k, v in runs.items()}
    step = {p: statistics.median(c[f"step_{p}_images_per_s"] for c in ceilings) for p in ("fp32", "bf16")}
    full, small = med["--train-size 0 (224 px)"], med["default (160 px)"]
    lines = [f"# `--train-size` in replace mode ({time.strftime('%Y-%m-%d')})", "",
             f"`python benchmarks/train_size.py --rounds {a.rounds} --epochs {a.epochs}`: cat breeds, "
             f"{len(train_items)} photos (seed {a.seed} split; 10 % of them validate), {a.epochs} epochs, "
             f"median of {a.rounds} interleaved rounds.", "", f"Machine: {cpu_line()}", "",
             "| run | train images/s | wall s | ÷ bare dense step fp32 | ÷ bare dense step bf16 |",
             "|---|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| vitlora train, {name} | {m['images_per_s']:.2f} | {m['wall_s']:.1f} | "
                     f"×{m['images_per_s'] / step['fp32']:.2f} | ×{m['images_per_s'] / step['bf16']:.2f} |")
    lines += [f"| bare dense LoRA step (`ceiling.py`, batch 32, 224 px) | fp32 {step['fp32']:.2f}, "
              f"bf16 {step['bf16']:.2f} | | | |", "",
              f"Default over `--train-size 0`: ×{small['images_per_s'] / full['images_per_s']:.2f} training "
              f"images/s, {full['wall_s'] / small['wall_s']:.2f}× shorter wall."]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n\nRaw: " + json.dumps({"runs": runs, "ceilings": ceilings}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
