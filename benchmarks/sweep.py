"""Recipe sweep: many `TrainConfig` variants, each scored on photos it never saw, in one process.

The same protocol as `quality.py` (it imports its splits), run in-process through the Python API so a
sweep of many short runs spends its time training, not starting interpreters:

* ``replace``: cat breeds, seeded stratified 80/20 split per seed (`quality.breeds_split`); accuracy and
  ECE on the 20 % (`vitlora.evaluate`), the linear probe on the same split once per seed.
* ``extend``: raccoon folds with the 100 + 100 training negatives of `quality.py`; recall on the fold,
  false positives and retention on the 400 test negatives, ImageNet top-1 and the share taken by the
  new label on the 500 ImageNet photos.

Every finished run appends one JSON line to ``--out`` at once (a killed sweep keeps what it measured);
the end prints the mean over seeds/folds per variant. Variants are ``NAME`` or ``NAME:key=value,...``
with `TrainConfig` field names (``pk50:patch_keep=0.5``, ``mix:mixup=0.8,cutmix=1.0``; a list
joined by ``+``: ``qkv:targets=query+key+value``).

    python benchmarks/sweep.py replace --seeds 0 1 --variants default pk50:patch_keep=0.5 --out /tmp/s.jsonl
    python benchmarks/sweep.py extend --folds 0 1 2 --variants default dl2:distill=2 --out /tmp/e.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, body = text.partition(":")
    kw: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        if "+" in raw:  # a list: targets=query+key+value
            kw[key] = raw.split("+")
            continue
        try:
            kw[key] = json.loads(raw)
        except json.JSONDecodeError:
            kw[key] = raw
    return name, kw


def train(kw: dict[str, Any], out: Path) -> tuple[Any, float]:
    import vitlora

    t0 = time.perf_counter()
    run = vitlora.train(vitlora.TrainConfig(model=str(q.MODEL), out=str(out), **kw), overwrite=True, progress=False)
    return run, time.perf_counter() - t0


def replace_row(work: Path, name: str, kw: dict[str, Any], seed: int,
                breeds: list[str] | None = None) -> dict[str, Any]:
    import vitlora

    data, test = work / f"breeds-s{seed}" / "train", work / f"breeds-s{seed}" / "test"
    if not data.exists():
        train_items, test_items = q.breeds_split(seed, breeds=breeds)
        for y in sorted({y for _, y in train_items}):
            q.link_folder(data / y, [f for f, c in train_items if c == y])
            q.link_folder(test / y, [f for f, c in test_items if c == y])
    run, wall = train(dict({"data": str(data), "seed": seed}, **kw), work / f"run-{name}-s{seed}")
    r = vitlora.evaluate(run, str(test))
    hist = json.loads((run.run_dir / "metrics.json").read_text())
    return {"task": "replace", "variant": name, "seed": seed, "n_test": r["n_images"], "accuracy": r["accuracy"],
            "ece": r["ece"], "ece_if_calibrated": r["ece_if_calibrated"], "reliability": r["reliability"],
            "wall_s": wall, "epochs_run": len(hist["epochs"]), "best_epoch": hist["best_epoch"]}


def pooled_ece(rows: list[dict[str, Any]]) -> tuple[float, int, float]:
    """ECE of every row's held-out photos taken together (from their reliability bins), how many photos,
    and the ECE a perfectly calibrated model would show on as many photos (`ece_if_calibrated` on the
    bins' mean scores).

    Each photo was scored by a run that never saw it; pooling the seeds gives ECE a sample large
    enough that its small-sample floor sits well below the 0.05 goal."""
    import torch

    from vitlora.metrics import ece_if_calibrated

    bins: dict[int, list[float]] = {}
    for r in rows:
        for k, b in enumerate(r.get("reliability") or []):
            if b["count"]:
                acc = bins.setdefault(k, [0.0, 0.0, 0.0])
                acc[0] += b["count"]
                acc[1] += b["count"] * b["confidence"]
                acc[2] += b["count"] * b["accuracy"]
    n = sum(c for c, _, _ in bins.values())
    if not n:
        return float("nan"), 0, float("nan")
    scores = torch.tensor([s / c for c, s, _ in bins.values() for _ in range(int(c))])
    return sum(abs(s - a) for _, s, a in bins.values()) / n, int(n), ece_if_calibrated(scores)


def extend_row(work: Path, name: str, kw: dict[str, Any], fold: int, folds: int, ctx: dict[str, Any]) -> dict[str, Any]:
    test = ctx["pos"][fold::folds]
    data = work / f"raccoon-f{fold}"
    if not data.exists():
        q.link_folder(data, [p for p in ctx["pos"] if p not in set(test)])
    cfg = dict({"data": str(data), "label": "raccoon", "negatives": str(ctx["neg_train"]), "seed": 0}, **kw)
    run, wall = train(cfg, work / f"run-{name}-f{fold}")

    def top1(files: list[Path]) -> dict[Path, tuple[str, float]]:
        return {Path(p.path): p.top_k[0] for p in run.predict(files, top_k=1, batch_size=64)}

    scores = q.extend_scores(top1(test), top1(ctx["neg_test"]), top1(list(ctx["inet"])), ctx["base"], ctx["inet"])
    return {"task": "extend", "variant": name, "fold": fold, **scores, "oof_recall": q._claimed_recall(run.run_dir),
            "wall_s": wall}


def extend_context(work: Path, seed: int = 0, n_neg: int = 100) -> dict[str, Any]:
    """quality.py's split (`quality.extend_split`), the base's top-1 on the test negatives, the ImageNet labels."""
    pos, neg_train, neg_test = q.extend_split(work, seed, n_neg)
    return {"pos": pos, "neg_train": neg_train, "neg_test": neg_test, "base": q.base_top1(neg_test),
            "inet": q.imagenet_labels()}


def summary(rows: list[dict[str, Any]]) -> str:
    keys = ["accuracy", "ece", "recall", "false_positive_rate", "retention", "imagenet_top1",
            "imagenet_taken_by_new", "ece_raccoon", "oof_recall", "wall_s", "epochs_run"]
    out = []
    for task in ("replace", "extend"):
        group: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["task"] == task:
                group.setdefault(r["variant"], []).append(r)
        if not group:
            continue
        cols = [k for k in keys if any(k in r for rs in group.values() for r in rs)]
        out += [f"\n{task}", "| variant | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for name, rs in group.items():
            vals = [np.mean([r[k] for r in rs if r.get(k) is not None] or [np.nan]) for k in cols]
            out.append(f"| {name} | {len(rs)} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        if task == "replace":
            for name, rs in group.items():
                e, n, floor = pooled_ece(rs)
                out.append(f"{name}: ECE of all {n} held-out predictions pooled over {len(rs)} runs: {e:.3f} "
                           f"(a perfectly calibrated model: {floor:.3f})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task", choices=["replace", "extend"])
    ap.add_argument("--variants", nargs="+", default=["default"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="replace: split + training seeds")
    ap.add_argument("--folds", type=int, nargs="+", default=[0], help="extend: which of the 5 raccoon folds")
    ap.add_argument("--out", required=True, help="JSON lines, one per finished run (appended)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--probe", action="store_true", help="replace: the linear probe per seed too")
    ap.add_argument("--breeds", nargs="+", default=None,
                    help="replace: only these cat breeds (e.g. the four American ones, a harder task)")
    a = ap.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vitlora-sweep-"))
    rows: list[dict[str, Any]] = []

    def keep(row: dict[str, Any]) -> None:
        rows.append(row)
        with open(a.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    if a.task == "replace" and a.probe:
        for seed in a.seeds:
            train_items, test_items = q.breeds_split(seed, breeds=a.breeds)
            keep({"task": "replace", "variant": "linear-probe", "seed": seed,
                  "accuracy": q.linear_probe(train_items, test_items)})
    ctx = extend_context(work) if a.task == "extend" else {}
    for text in a.variants:
        name, kw = parse_variant(text)
        for k in (a.seeds if a.task == "replace" else a.folds):
            try:
                keep(replace_row(work, name, kw, k, a.breeds) if a.task == "replace"
                     else extend_row(work, name, kw, k, 5, ctx))
            except Exception as exc:  # one broken variant must not cost the rest of the sweep
                print(f"{name} {k}: {type(exc).__name__}: {exc}", flush=True)
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
