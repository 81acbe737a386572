"""Quality on photos a run never saw: both workflows, scored with a protocol that cannot fool itself.

Nothing is ever scored on photos that trained a run or chose its threshold, epoch or temperature:

* **extend** (raccoon): k folds over ``../shared/data/raccoon``; each fold's run trains on the
  other k-1 folds (vitlora holds out its own validation photos *inside* those) and is scored on
  the fold. ``../shared/data/pets-negatives`` is split once by a seeded shuffle into training
  negatives (given as ``--negatives``) and test negatives (never seen): false-positive rate and
  retention (top-1 unchanged from the base model's) are measured on the test negatives only.
  ``../shared/data/imagenet-samples`` (500 labelled photos) gives the old classes' top-1 next to
  the base model's, and the share of them taken by the new label.
  ECE (top-1 score, 15 equal-width bins, ``vitlora.metrics``) on the fold's raccoons and on the
  ImageNet photos; ``oof_recall`` is what the run's own (out-of-fold) summary claimed, beside
  the recall measured on the fold.
* **replace** (``../shared/data/cat-breeds``, 5 breeds): a seeded stratified 80/20 split;
  accuracy and ECE on the 20 %, next to a linear probe (logistic regression on the frozen
  base's features, trained on the same 80 %).
* **replace with negatives** ("none of these"): the same split trained with ``--negatives``
  (half of the pets-negatives dogs and half of the ImageNet photos that are not domestic cats);
  off-task test photos are the other dogs and ImageNet photos. ``vitlora eval --negatives``
  gives the share of them answered "unknown", the in-task accuracy (drop against the run
  without negatives) and the rejection AUROC.

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
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("VITLORA_SHARED") or HERE.parent.parent / "shared")  # elsewhere (a GPU box): set it
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


def ece(scores: list[float], correct: list[bool]) -> float:
    """Expected calibration error of the top-1 score (vitlora.metrics: 15 equal-width bins, Guo et al. 2017)."""
    import torch

    from vitlora.metrics import expected_calibration_error

    return expected_calibration_error(torch.tensor(scores, dtype=torch.float64), torch.tensor(correct))


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


def extend_split(work: Path, seed: int, n_neg: int = 100) -> tuple[list[Path], Path, list[Path]]:
    """(raccoons in fold order: fold k is pos[k::folds], the training negatives' folder - n_neg cats and
    n_neg dogs linked under `work` -, the other pets photos for scoring): one seeded shuffle."""
    rng = random.Random(seed)
    pos = images(RACCOON)
    rng.shuffle(pos)
    cats, dogs = images(PETS / "cat"), images(PETS / "dog")
    rng.shuffle(cats)
    rng.shuffle(dogs)
    neg_train = work / "neg-train"
    if not neg_train.exists():
        link_folder(neg_train, cats[:n_neg] + dogs[:n_neg])
    return pos, neg_train, cats[n_neg:] + dogs[n_neg:]


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
    answers = [{k: top1(r) for k, r in p.items()} for p in (p_pos, p_neg, p_in)]
    return {"run": tag, **extend_scores(*answers, base, inet), "oof_recall": _claimed_recall(run)}


def extend_scores(pos: dict, neg: dict, inet_answers: dict, base: dict, inet: dict,
                  new: str = "raccoon") -> dict[str, Any]:
    """Extend-mode figures from photo -> (top-1 label, score) of fresh positives, test negatives and the
    ImageNet photos; `base`: the base model's top-1 per negative, `inet`: the ImageNet photos' labels."""
    return {
        "n_pos": len(pos), "n_neg": len(neg), "n_imagenet": len(inet_answers),
        "recall": float(np.mean([lab == new for lab, _ in pos.values()])),
        "false_positive_rate": float(np.mean([lab == new for lab, _ in neg.values()])),
        "retention": float(np.mean([lab == base[k] for k, (lab, _) in neg.items()])),
        "imagenet_top1": float(np.mean([lab == inet[k] for k, (lab, _) in inet_answers.items()])),
        "imagenet_taken_by_new": float(np.mean([lab == new for lab, _ in inet_answers.values()])),
        "ece_raccoon": ece([s for _, s in pos.values()], [lab == new for lab, _ in pos.values()]),
        "ece_imagenet": ece([s for _, s in inet_answers.values()],
                            [lab == inet[k] for k, (lab, _) in inet_answers.items()]),
    }


def _claimed_recall(run: Path) -> float | None:
    """The recall the run's own summary printed (out of fold where it cross-fitted, else held out)."""
    ext = json.loads((run / "vitlora.json").read_text()).get("extend", {})
    part = ext.get("out_of_fold") or ext.get("held_out") or {}
    return (part.get("new_class_recall") or {}).get("mean")


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


DOMESTIC_CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}  # in-task for cat breeds


def breeds_split(seed: int, cap: int | None = None,
                 breeds: list[str] | None = None) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Seeded 80/20 per breed; `cap` keeps only that many of each breed's 80 % for training (a cheaper run);
    `breeds` keeps only those (a harder task: the four American breeds)."""
    rng = random.Random(seed)
    train, test = [], []
    for cls in sorted(d for d in BREEDS.iterdir() if d.is_dir() and (breeds is None or d.name in breeds)):
        files = images(cls)
        rng.shuffle(files)
        cut = int(0.8 * len(files))
        train += [(f, cls.name) for f in files[:cut][:cap]]
        test += [(f, cls.name) for f in files[cut:]]
    return train, test


def off_task_split(seed: int) -> tuple[list[Path], list[Path]]:
    """(training negatives, test off-task photos) for the cat-breed task: dogs and non-cat ImageNet photos, halved."""
    rng = random.Random(seed + 1)
    other = images(PETS / "dog") + [p for p, lab in imagenet_labels().items() if lab not in DOMESTIC_CATS]
    rng.shuffle(other)
    return other[: len(other) // 2], other[len(other) // 2 :]


def replace_breeds(a, work: Path, negatives: bool) -> dict[str, Any]:
    train, test = breeds_split(a.seed, a.breeds_train_cap)
    tag = "breeds-neg" if negatives else "breeds"
    data, test_dir = work / "breeds-train", work / "breeds-test"
    if not data.exists():
        for y in sorted({y for _, y in train}):
            link_folder(data / y, [f for f, c in train if c == y])
            link_folder(test_dir / y, [f for f, c in test if c == y])
    neg_train, off_test = off_task_split(a.seed)
    run = work / f"{tag}-run"
    args = ["train", str(data), "--model", str(MODEL), "--out", str(run), "--seed", str(a.seed)]
    if negatives:
        link_folder(work / "breeds-neg-train", neg_train)
        args += ["--negatives", str(work / "breeds-neg-train")]
    cli(args + (["--epochs", str(a.epochs)] if a.epochs else []) + a.extra, work / f"{tag}-train.log")
    off = work / f"{tag}-off-test"
    link_folder(off, off_test)
    out = work / f"{tag}-eval.json"
    cli(["eval", str(run), str(test_dir), "--negatives", str(off), "--json", str(out)], work / f"{tag}-eval.log")
    r = json.loads(out.read_text())
    row = {"run": f"replace cat-breeds{' + negatives' if negatives else ''}", "n_train": len(train),
           "n_test": r["n_images"], "n_off_task": r["n_negatives"], "accuracy": r["accuracy"], "ece": r["ece"],
           "rejection_auroc": r["rejection_auroc"], "fpr_at_95_tpr": r["fpr_at_95_tpr"],
           "temperature": json.loads((run / "vitlora.json").read_text()).get("calibration", {}).get("temperature")}
    if negatives:
        row.update(off_task_rejected=r["negatives_rejected"], in_task_rejected=r["in_task_rejected"])
    else:
        row["linear_probe_accuracy"] = linear_probe(train, test)
    return row


STACK_BREEDS = ["Abyssinian", "American_Bobtail", "American_Curl", "American_Shorthair"]


def stack_breed_split(seed: int) -> dict[str, tuple[list[Path], list[Path]]]:
    """breed -> (150 training photos, 45 held-out photos): one seeded shuffle per breed, in STACK_BREEDS order."""
    rng = random.Random(seed + 2)
    out = {}
    for breed in STACK_BREEDS:
        files = images(BREEDS / breed)
        rng.shuffle(files)
        out[breed] = (files[:150], files[150:195])
    return out


def label_recalls(run: Path, tests: dict[str, list[Path]], work: Path, tag: str) -> dict[str, Any]:
    """Recall and count per label of `run`'s top-1 on each label's held-out photos, and `breed_confusions`:
    true label -> {answered label: count}."""
    row: dict[str, Any] = {"breed_confusions": {}}
    for label, files in tests.items():
        answers = [top1(r)[0] for r in predict(run, files, work, f"{tag}-{label}").values()]
        row[f"recall_{label}"] = float(np.mean([a == label for a in answers]))
        row[f"n_{label}"] = len(answers)
        row["breed_confusions"][label] = dict(Counter(answers).most_common())
    return row


def stack_sequence(a, work: Path, pos_train: list[Path], pos_test: list[Path], neg_train: Path,
                   inet: dict[Path, str]) -> dict[str, Any]:
    """Issue 11 goal 5: a raccoon run (with negatives), then four cat breeds added one after another with
    `--model PREVIOUS_RUN` (150 photos each, positives only, defaults); the last run is scored on photos no
    step saw: each breed's held-out photos (45 each), the raccoon fold, the ImageNet photos."""
    epochs = ["--epochs", str(a.epochs)] if a.epochs else []
    data = work / "stack" / "raccoon"
    link_folder(data, pos_train)
    run = work / "stack" / "run-0-raccoon"
    cli(["train", str(data), "--label", "raccoon", "--model", str(MODEL), "--out", str(run), "--seed", str(a.seed),
         "--negatives", str(neg_train)] + epochs + a.extra, work / "stack-0-train.log")
    tests: dict[str, list[Path]] = {"raccoon": pos_test}
    for i, (breed, (train, test)) in enumerate(stack_breed_split(a.seed).items(), 1):
        tests[breed] = test
        folder = work / "stack" / breed
        link_folder(folder, train)
        nxt = work / "stack" / f"run-{i}-{breed}"
        cli(["train", str(folder), "--label", breed, "--model", str(run), "--out", str(nxt), "--seed", str(a.seed)]
            + epochs + a.extra, work / f"stack-{i}-train.log")
        run = nxt
    row: dict[str, Any] = {"run": f"stacked: raccoon + {len(STACK_BREEDS)} breeds (scored after the last step)"}
    row.update(label_recalls(run, tests, work, "stack"))
    p_in = predict(run, images(IMAGENET), work, "stack-inet")
    row["imagenet_top1"] = float(np.mean([top1(r)[0] == inet[k] for k, r in p_in.items()]))
    row["imagenet_taken_by_new"] = float(np.mean([top1(r)[0] in tests for r in p_in.values()]))
    row["n_imagenet"] = len(p_in)
    return row


def stack_joint(a, work: Path) -> dict[str, Any]:
    """The stacked breeds' ceiling: one replace-mode run trained on all four breeds' 150 photos at once (what
    sequential steps approach at best), scored on the same 45 held-out photos per breed."""
    split = stack_breed_split(a.seed)
    data = work / "stack-joint"
    for breed, (train, _) in split.items():
        link_folder(data / breed, train)
    run = work / "stack-joint-run"
    epochs = ["--epochs", str(a.epochs)] if a.epochs else []
    cli(["train", str(data), "--model", str(MODEL), "--out", str(run), "--seed", str(a.seed)] + epochs + a.extra,
        work / "stack-joint-train.log")
    row: dict[str, Any] = {"run": f"joint replace-mode run on the same {len(STACK_BREEDS)} breeds (ceiling)"}
    row.update(label_recalls(run, {b: test for b, (_, test) in split.items()}, work, "joint"))
    return row


def base_row(inet: dict[Path, str]) -> dict[str, Any]:
    """The base model on the ImageNet photos: top-1 and ECE of its own softmax (what extend mode must keep)."""
    import torch
    from transformers import AutoModelForImageClassification

    from vitlora.data import Preprocess, normalize, stream_decoded

    model = AutoModelForImageClassification.from_pretrained(MODEL).eval()
    pp = Preprocess.from_pretrained(str(MODEL))
    scores, correct = [], []
    with torch.inference_mode():
        for batch, paths, _ in stream_decoded([str(f) for f in inet], pp, 64):
            if len(paths):
                p = torch.softmax(model(pixel_values=normalize(batch, pp)).logits, -1).max(-1)
                scores += p.values.tolist()
                correct += [model.config.id2label[int(i)] == inet[Path(f)] for f, i in zip(paths, p.indices)]
    return {"run": "base model (no training)", "n_imagenet": len(correct),
            "imagenet_top1": float(np.mean(correct)), "ece_imagenet": ece(scores, correct)}


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["run", "n_pos", "n_neg", "recall", "oof_recall", "false_positive_rate", "retention", "imagenet_top1",
            "imagenet_taken_by_new", "ece_raccoon", "ece_imagenet", "n_test", "n_off_task", "accuracy", "ece",
            "temperature", "off_task_rejected", "in_task_rejected", "rejection_auroc", "fpr_at_95_tpr",
            "in_task_accuracy_drop", "linear_probe_accuracy"]
    cols = [c for c in cols if any(c in r for r in rows)]
    cols += list(dict.fromkeys(k for r in rows for k in r if k.startswith("recall_")))  # the stacking row's
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def mean_rows(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    keys = [k for k, v in rows[0].items() if isinstance(v, float) and all(isinstance(r.get(k), float) for r in rows)]
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
    ap.add_argument("--only", choices=["all", "extend", "replace", "stack"], default="all",
                    help="all = extend + replace; stack (not in all: ~5 runs) = the stacking sequence on fold 0")
    ap.add_argument("--extend-runs", choices=["both", "with-negatives", "positives-only"], default="both",
                    help="which extend scenarios to run")
    ap.add_argument("--breeds-train-cap", type=int, default=None,
                    help="train replace mode on at most this many photos per breed (test set unchanged)")
    ap.add_argument("--quick", action="store_true", help="1 fold, 2 epochs")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: extra args for vitlora train")
    a = ap.parse_args(argv)
    a.extra = [x for x in a.extra if x != "--"]
    if a.quick:
        a.run_folds, a.epochs = 1, a.epochs or 2
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vitlora-quality-"))
    rows: list[dict[str, Any]] = []
    if a.only in ("all", "extend", "stack"):
        pos, neg_train, neg_test = extend_split(work, a.seed, a.train_negatives)
        inet = imagenet_labels()
        if a.only == "stack":
            test = pos[0::a.folds]
            rows.append(stack_sequence(a, work, [p for p in pos if p not in set(test)], test, neg_train, inet))
            rows.append(stack_joint(a, work))
        base = base_top1(neg_test) if a.only != "stack" else {}
        scenarios = {"both": (True, False), "with-negatives": (True,), "positives-only": (False,)}[a.extend_runs]
        for with_neg in scenarios if a.only != "stack" else ():
            fold_rows = []
            for k in range(a.run_folds or a.folds):
                test = pos[k::a.folds]
                train = [p for p in pos if p not in set(test)]
                fold_rows.append(extend_fold(a, work, k, train, test, neg_train if with_neg else None,
                                             neg_test, base, inet))
                print(table(fold_rows[-1:]), flush=True)
            rows += fold_rows
            rows.append(mean_rows(fold_rows, f"extend {'with' if with_neg else 'without'} negatives, mean"))
        rows.append(base_row(inet))
    if a.only in ("all", "replace"):
        for negatives in (False, True):
            rows.append(replace_breeds(a, work, negatives))
            print(table(rows[-1:]), flush=True)
        plain, neg = rows[-2], rows[-1]
        neg["in_task_accuracy_drop"] = plain["accuracy"] - neg["accuracy"]
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))
    print(f"workdir: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
