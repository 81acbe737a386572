"""Quality on photos a run never saw: both workflows, scored with a protocol that cannot fool itself.

Nothing is ever scored on photos that trained a run or chose its threshold, epoch or temperature:

* **extend** (raccoon): k folds over ``../shared/data/raccoon``; each fold's run trains on the
  other k-1 folds (vitlora holds out its own validation photos *inside* those) and is scored on
  the fold. ``../shared/data/pets-negatives`` is split once by a seeded shuffle into training
  negatives (given as ``--negatives``) and test negatives (never seen): false-positive rate and
  retention (top-1 unchanged from the base model's) are measured on the test negatives only.
  ``../shared/data/imagenet-samples`` (500 labelled photos) gives the old classes' top-1 next to
  the base model's, and the share of them taken by the new label.
* **replace** (``../shared/data/cat-breeds``, 5 breeds): a seeded stratified 80/20 split;
  accuracy and ECE (top-1 score, 15 equal-width bins) on the 20 %, next to a linear probe
  (logistic regression on the frozen base's features, trained on the same 80 %).

Runs go through the CLI exactly as a user runs them (``vitlora train``, ``vitlora predict --json``).
Prints one markdown table; ``--json`` keeps every number. ``--quick``: 1 fold, 2 epochs, a smoke run.

    python benchmarks/quality.py                 # full protocol (~10-25 min on 2 cores)
    python benchmarks/quality.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
MODEL = SHARED / "models" / "deit-tiny-patch16-224"
RACCOON = SHARED / "data" / "raccoon"
PETS = SHARED / "data" / "pets-negatives"
IMAGENET = SHARED / "data" / "imagenet-samples"
BREEDS = SHARED / "data" / "cat-breeds"
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
VITLORA = [sys.executable, "-c", "import sys; from vitlora.cli import main; sys.exit(main())"]


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.is_file())


def link_folder(dest: Path, files: list[Path]) -> dict[str, Path]:
    """A folder of symlinks (the photos a run may see, without copying them): link name -> photo."""
    dest.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, f in enumerate(files):
        name = f"{i:05d}_{f.name}"  # unique even where two folders hold the same file name
        (dest / name).symlink_to(f.resolve())
        names[name] = f
    return names


def cli(args: list[str], log: Path) -> None:
    with open(log, "w") as fh:
        r = subprocess.run(VITLORA + args, stdout=fh, stderr=subprocess.STDOUT,
                           env=dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1"))
    if r.returncode != 0:
        raise SystemExit(f"vitlora {' '.join(args[:2])} failed (exit {r.returncode}); log: {log}")


def predict(run: Path, files: list[Path], work: Path, tag: str) -> dict[str, dict[str, Any]]:
    """photo -> predict --json row (top_k labels/scores, and 'rejected' where the run has it)."""
    out = work / f"pred-{tag}.json"
    listing = work / f"list-{tag}"
    names = link_folder(listing, files)
    cli(["predict", str(run), str(listing), "--json", str(out), "--top-k", "5", "--precision", "fp32"],
        work / f"predict-{tag}.log")
    rows = json.loads(out.read_text())
    return {names[Path(r["path"]).name]: r for r in rows}


def top1(row: dict[str, Any]) -> tuple[str, float]:
    item = row["top_k"][0]
    return item["label"], float(item["score"])


def ece(scores: list[float], correct: list[bool], bins: int = 15) -> float:
    """Expected calibration error of the top-1 score, equal-width bins (Guo et al. 2017)."""
    s, c = np.asarray(scores, float), np.asarray(correct, float)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (s > lo) & (s <= hi) if lo > 0 else (s >= lo) & (s <= hi)
        if m.any():
            total += m.mean() * abs(s[m].mean() - c[m].mean())
    return float(total)


def base_top1(files: list[Path]) -> dict[Path, str]:
    """The base model's top-1 label per photo, with vitlora's own (processor-exact) preprocessing."""
    import torch
    from transformers import AutoModelForImageClassification

    from vitlora.data import Preprocess, normalize, stream_decoded

    model = AutoModelForImageClassification.from_pretrained(MODEL).eval()
    pp = Preprocess.from_pretrained(str(MODEL))
    out: dict[str, str] = {}
    with torch.inference_mode():
        for batch, paths, _ in stream_decoded([str(f) for f in files], pp, 64):
            if len(paths):
                ids = model(pixel_values=normalize(batch, pp)).logits.argmax(-1).tolist()
                out.update({Path(p): model.config.id2label[i] for p, i in zip(paths, ids)})
    return out


def imagenet_labels() -> dict[Path, str]:
    import csv

    with open(IMAGENET / "labels.csv", newline="") as fh:
        return {IMAGENET / r["path"]: r["label"] for r in csv.DictReader(fh)}


def extend_fold(a, work: Path, fold: int, pos_train: list[Path], pos_test: list[Path], neg_train: Path | None,
                neg_test: list[Path], base: dict[str, str], inet: dict[str, str]) -> dict[str, Any]:
    tag = f"extend-{'neg' if neg_train else 'pos'}-f{fold}"
    data = work / tag / "raccoon"
    link_folder(data, pos_train)
    run = work / tag / "run"
    args = ["train", str(data), "--label", "raccoon", "--model", str(MODEL), "--out", str(run), "--seed", str(a.seed)]
    args += ["--epochs", str(a.epochs)] if a.epochs else []
    args += ["--negatives", str(neg_train)] if neg_train else []
    cli(args + a.extra, work / f"{tag}-train.log")
    p_pos = predict(run, pos_test, work, f"{tag}-pos")
    p_neg = predict(run, neg_test, work, f"{tag}-neg")
    p_in = predict(run, images(IMAGENET), work, f"{tag}-inet")
    inet_top1 = [top1(r)[0] for r in p_in.values()]
    return {
        "run": tag, "n_pos": len(p_pos), "n_neg": len(p_neg), "n_imagenet": len(p_in),
        "recall": float(np.mean([top1(r)[0] == "raccoon" for r in p_pos.values()])),
        "false_positive_rate": float(np.mean([top1(r)[0] == "raccoon" for r in p_neg.values()])),
        "retention": float(np.mean([top1(r)[0] == base[k] for k, r in p_neg.items()])),
        "imagenet_top1": float(np.mean([top1(r)[0] == inet[k] for k, r in p_in.items()])),
        "imagenet_taken_by_new": float(np.mean([lab == "raccoon" for lab in inet_top1])),
        "ece_raccoon": ece([top1(r)[1] for r in p_pos.values()], [top1(r)[0] == "raccoon" for r in p_pos.values()]),
    }


def linear_probe(train: list[tuple[Path, str]], test: list[tuple[Path, str]]) -> float:
    """Accuracy of logistic regression on the frozen base's CLS features (the head's input)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModelForImageClassification

    from vitlora.data import Preprocess, normalize, stream_decoded

    model = AutoModelForImageClassification.from_pretrained(MODEL).eval()
    pp = Preprocess.from_pretrained(str(MODEL))

    def feats(items):
        lab = {str(p): y for p, y in items}
        xs, ys = [], []
        with torch.inference_mode():
            for batch, paths, _ in stream_decoded(list(lab), pp, 64):
                if len(paths):
                    xs.append(model.vit(pixel_values=normalize(batch, pp)).last_hidden_state[:, 0].numpy())
                    ys += [lab[p] for p in paths]
        return np.concatenate(xs), ys

    xtr, ytr = feats(train)
    xte, yte = feats(test)
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(xtr, ytr)
    return float((clf.predict(xte) == np.asarray(yte)).mean())


def replace_breeds(a, work: Path) -> dict[str, Any]:
    rng = random.Random(a.seed)
    train, test = [], []
    for cls in sorted(d for d in BREEDS.iterdir() if d.is_dir()):
        files = images(cls)
        rng.shuffle(files)
        cut = int(0.8 * len(files))
        train += [(f, cls.name) for f in files[:cut]]
        test += [(f, cls.name) for f in files[cut:]]
    data = work / "breeds-train"
    for y in sorted({y for _, y in train}):
        link_folder(data / y, [f for f, c in train if c == y])
    run = work / "breeds-run"
    args = ["train", str(data), "--model", str(MODEL), "--out", str(run), "--seed", str(a.seed)]
    cli(args + (["--epochs", str(a.epochs)] if a.epochs else []) + a.extra, work / "breeds-train.log")
    truth = dict(test)
    preds = predict(run, [f for f, _ in test], work, "breeds")
    correct = [top1(r)[0] == truth[k] for k, r in preds.items()]
    return {"run": "replace-cat-breeds", "n_train": len(train), "n_test": len(preds),
            "accuracy": float(np.mean(correct)), "ece": ece([top1(r)[1] for r in preds.values()], correct),
            "linear_probe_accuracy": linear_probe(train, test)}


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["run", "n_pos", "n_neg", "recall", "false_positive_rate", "retention", "imagenet_top1",
            "imagenet_taken_by_new", "ece_raccoon", "n_test", "accuracy", "ece", "linear_probe_accuracy"]
    cols = [c for c in cols if any(c in r for r in rows)]
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def mean_rows(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    out = {"run": name, "n_pos": sum(r["n_pos"] for r in rows), "n_neg": rows[0]["n_neg"]}
    out.update({k: float(np.mean([r[k] for r in rows])) for k in keys})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folds", type=int, default=5, help="k folds over the raccoon photos")
    ap.add_argument("--run-folds", type=int, default=None, help="run only the first N folds (default: all)")
    ap.add_argument("--train-negatives", type=int, default=100, help="cats and as many dogs given as --negatives")
    ap.add_argument("--epochs", type=int, default=None, help="passed to vitlora train (default: its own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["all", "extend", "replace"], default="all")
    ap.add_argument("--quick", action="store_true", help="1 fold, 2 epochs")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: extra args for vitlora train")
    a = ap.parse_args(argv)
    a.extra = [x for x in a.extra if x != "--"]
    if a.quick:
        a.run_folds, a.epochs = 1, a.epochs or 2
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vitlora-quality-"))
    rng = random.Random(a.seed)
    rows: list[dict[str, Any]] = []
    if a.only in ("all", "extend"):
        pos = images(RACCOON)
        rng.shuffle(pos)
        cats, dogs = images(PETS / "cat"), images(PETS / "dog")
        rng.shuffle(cats)
        rng.shuffle(dogs)
        n = a.train_negatives
        neg_train = work / "neg-train"
        link_folder(neg_train, cats[:n] + dogs[:n])
        neg_test = cats[n:] + dogs[n:]
        base = base_top1(neg_test)
        inet = imagenet_labels()
        for with_neg in (True, False):
            fold_rows = []
            for k in range(a.run_folds or a.folds):
                test = pos[k::a.folds]
                train = [p for p in pos if p not in set(test)]
                fold_rows.append(extend_fold(a, work, k, train, test, neg_train if with_neg else None,
                                             neg_test, base, inet))
                print(table(fold_rows[-1:]), flush=True)
            rows += fold_rows
            rows.append(mean_rows(fold_rows, f"extend {'with' if with_neg else 'without'} negatives, mean"))
        base_in = base_top1(images(IMAGENET))
        rows.append({"run": "base model (no training)", "n_imagenet": len(base_in),
                     "imagenet_top1": float(np.mean([base_in[Path(k)] == v for k, v in inet.items() if Path(k) in base_in]))})
    if a.only in ("all", "replace"):
        rows.append(replace_breeds(a, work))
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))
    print(f"workdir: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
