"""Extend-mode quality goals on real data: the shared DeiT-tiny and the shared raccoon photos.

Fixed construction (seed 0 everywhere):

* positives: the 150 shared raccoon photos split 100 train / 50 test with vitlora's own
  `stratified_split(fraction=1/3, seed=0)`; training holds out 10 % of its 100 (default
  `--val-split 0.1`) for epoch selection and bias calibration, so the test photos are
  never seen in training or calibration;
* negatives: `vitlora.negatives.make_negatives(split="train")` for training and
  `split="test"` for testing: crops of *different* source images (scikit-image /
  scikit-learn sample images), 8 per source image. They are mostly objects, textures and
  scientific images; the only animal is a cat (test side). The lab recipe itself calls
  none of them "raccoon", so on this set the false-positive goal is the easy part and
  retention (old top-1 kept) is the one that separates recipes;
* replace mode on labels the base knows: every sample image whose whole-image base top-1
  probability is >= 0.5 gives a class named after that top-1 label (so by construction
  the base "knows" it, whether or not it is the photo's true content, e.g. the brick
  texture is "solar dish"); its 16 crops (`make_negatives`-style) are the class's images.
  Validation crops come from the same source images as training crops.

Goals asserted (from the issue): with negatives recall >= 0.95, FP <= 2 %, retention >=
98 %; positives only recall >= 0.90 with FP <= 10 %; replace mode validation accuracy >=
the base model's own accuracy restricted to those labels. All through the CLI, as a user
runs it. Trained runs are shared by module-scoped fixtures to fit the CI budget.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import DEIT, RACCOON

from vitlora.cli import main

pytestmark = pytest.mark.slow

SEED = 0
EPOCHS = "3"
COMMON = ["--model", DEIT, "--epochs", EPOCHS, "--seed", str(SEED), "--quiet"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module", autouse=True)
def _shared():
    if not (DEIT.is_dir() and RACCOON.is_dir()):
        pytest.skip("shared DeiT-tiny model / raccoon photos not present")
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TQDM_DISABLE"] = "1"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from vitlora.data import discover, stratified_split
    from vitlora.negatives import make_negatives

    root = tmp_path_factory.mktemp("raccoon-quality")
    train, test = stratified_split(discover(str(RACCOON), label="raccoon").samples, 1 / 3, SEED)
    assert (len(train), len(test)) == (100, 50)
    for name, samples in (("train", train), ("test", test)):
        (root / name).mkdir()
        for s in samples:
            (root / name / Path(s.path).name).symlink_to(Path(s.path).resolve())
    make_negatives(root / "neg-train", "train", per_image=8, seed=SEED)
    make_negatives(root / "neg-test", "test", per_image=8, seed=SEED)
    return {"train": root / "train", "test": root / "test", "neg_train": root / "neg-train",
            "neg_test": root / "neg-test", "root": root}


def _eval(run: Path, data: dict[str, Path]) -> dict:
    out = run.parent / f"{run.name}-eval.json"
    assert run_cli("eval", run, data["test"], "--label", "raccoon", "--negatives", data["neg_test"],
                   "--json", out) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def with_negatives(data) -> dict:
    run = data["root"] / "run-negatives"
    assert run_cli("train", data["train"], "--label", "raccoon", "--negatives", data["neg_train"],
                   "--out", run, *COMMON) == 0
    return {"run": run, "eval": _eval(run, data)}


@pytest.fixture(scope="module")
def positives_only(data) -> dict:
    run = data["root"] / "run-positives"
    assert run_cli("train", data["train"], "--label", "raccoon", "--out", run, *COMMON) == 0
    return {"run": run, "eval": _eval(run, data)}


def test_with_negatives_meets_goals(with_negatives):
    r = with_negatives["eval"]
    summary = (f"recall {r['new_class_recall']['mean']:.3f}, FP {r['false_positive_rate']:.3f}, "
               f"retention {r['retention']:.3f}")
    assert r["new_class_recall"]["mean"] >= 0.95, summary
    assert r["false_positive_rate"] <= 0.02, summary
    assert r["retention"] >= 0.98, summary
    assert r["n_negatives"] == 13 * 8


def test_with_negatives_records_validation_metrics(with_negatives):
    metrics = json.loads((with_negatives["run"] / "metrics.json").read_text())
    assert len(metrics["epochs"]) == int(EPOCHS)
    for e in metrics["epochs"]:
        assert {"new_class_recall", "false_positive_rate", "retention"} <= set(e)
    held = metrics["extend"]["held_out"]
    assert held["n_negatives"] == 16  # whole source images held out: 2 x 8 of the 15 x 8 training negatives
    assert metrics["extend"]["calibration"]["raccoon"]["calibrated"]


def test_positives_only_meets_goals(positives_only, capsys):
    r = positives_only["eval"]
    summary = f"recall {r['new_class_recall']['mean']:.3f}, FP {r['false_positive_rate']:.3f}"
    assert r["new_class_recall"]["mean"] >= 0.90, summary
    assert r["false_positive_rate"] <= 0.10, summary
    metrics = json.loads((positives_only["run"] / "metrics.json").read_text())
    assert "false_positive_rate" not in metrics["epochs"][-1]  # nothing to measure it on


@pytest.fixture(scope="module")
def known_labels(data) -> tuple[Path, list[str]]:
    """ImageFolder: one class per sample image the base is confident about, named by its top-1."""
    from vitlora.data import load_rgb, normalize, resize_for_eval
    from vitlora.data.transforms import Preprocess
    from vitlora.modeling import load_base
    from vitlora.negatives import make_negatives, source_names

    wholes = make_negatives(data["root"] / "wholes", "all", per_image=1, seed=SEED)
    model, _ = load_base(str(DEIT))
    pp = Preprocess.from_pretrained(str(DEIT))
    x = normalize(torch.stack([resize_for_eval(load_rgb(str(p)), pp) for p in wholes]), pp)
    with torch.no_grad():
        probs = model(pixel_values=x).logits.softmax(-1)
    top_p, top_i = probs.max(-1)
    chosen: dict[str, str] = {}  # source image -> class label
    for name, p, i in zip(source_names("all"), top_p.tolist(), top_i.tolist()):
        label = model.config.id2label[i].split(",")[0].strip()
        if p >= 0.5 and label not in chosen.values():
            chosen[name] = label
    assert len(chosen) >= 4, chosen
    root = data["root"] / "known"
    for c in make_negatives(data["root"] / "known-src", "all", per_image=16, seed=SEED, sources=list(chosen)):
        folder = root / chosen[c.parent.name]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / c.name).symlink_to(c)
    return root, sorted(chosen.values())


def test_replace_mode_on_known_labels_at_least_base_accuracy(known_labels, data):
    import vitlora
    from vitlora.data import build_cache, discover, normalize, stratified_split
    from vitlora.modeling import load_base
    from vitlora.surgery import match_labels

    folder, labels = known_labels
    run = data["root"] / "run-known"
    assert run_cli("train", folder, "--out", run, "--val-split", "0.25", *COMMON) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    meta = json.loads((run / "vitlora.json").read_text())
    assert set(meta["matched_labels"]) == set(labels)
    # the base's accuracy on the same validation crops, restricted to these labels
    base, _ = load_base(str(DEIT))
    source = discover(str(folder))
    _, val = stratified_split(source.samples, 0.25, SEED)
    ids = match_labels(source.labels, [base.config.id2label[i] for i in range(1000)])
    pp = vitlora.load(run).preprocess
    cache, _ = build_cache(val, {lab: k for k, lab in enumerate(source.labels)}, pp, train=False)
    rows = torch.tensor([ids[lab] for lab in source.labels])
    with torch.no_grad():
        logits = base(pixel_values=normalize(cache.batch(torch.arange(len(cache)))[0], pp)).logits
    base_acc = float((logits[:, rows].argmax(-1) == cache.labels).float().mean())
    assert metrics["epochs"][0]["val_accuracy"] >= base_acc - 0.15  # starts near the base, not from chance
    assert metrics["best_val_accuracy"] >= base_acc, (metrics["best_val_accuracy"], base_acc)
