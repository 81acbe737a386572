"""Real end to end: extend the pretrained DeiT-tiny with `raccoon` from the shared photos.

Trains through the CLI on a fixed split (120 train / 30 held out, seed 0), then checks on
the held-out photos: recall is high, the run reloads with plain transformers + peft and
gives vitlora's predictions, `vitlora merge` + `pipeline()` agrees, and `vitlora eval`'s
numbers equal a hand computation from the predictions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import DEIT, RACCOON, need_shared, plain_peft_model
from vitlora.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> tuple[Path, Path]:
    need_shared()
    photos = sorted(RACCOON.glob("*.jpg"))
    random.Random(0).shuffle(photos)
    root = tmp_path_factory.mktemp("raccoon-split")
    train, test = root / "train", root / "test"
    for folder, items in ((train, photos[:120]), (test, photos[120:])):
        folder.mkdir()
        for p in items:
            (folder / p.name).symlink_to(p)
    return train, test


@pytest.fixture(scope="module")
def run_dir(split, tmp_path_factory) -> Path:
    train, _ = split
    out = tmp_path_factory.mktemp("runs") / "raccoon"
    code = main(["train", str(train), "--label", "raccoon", "--model", str(DEIT), "--out", str(out),
                 "--epochs", "3", "--val-split", "0.15", "--quiet"])
    assert code == 0
    return out


def test_held_out_raccoons_are_recognised(run_dir: Path, split, tmp_path: Path):
    _, test = split
    out = tmp_path / "pred.json"
    assert main(["predict", str(run_dir), str(test), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 30
    recall = sum(r["top_k"][0]["label"] == "raccoon" for r in rows) / len(rows)
    assert recall >= 0.9, recall
    info = json.loads((run_dir / "labels.json").read_text())
    assert len(info["id2label"]) == 1001 and info["new_labels"] == ["raccoon"]


def test_plain_peft_reload_and_merge_agree(run_dir: Path, split, tmp_path: Path):
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    import vitlora

    _, test = split
    files = sorted(test.iterdir())[:8]
    plain = plain_peft_model(DEIT, run_dir)
    processor = AutoImageProcessor.from_pretrained(run_dir)
    x = processor([Image.open(f) for f in files], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        plain_probs = plain(pixel_values=x).logits.softmax(-1)
    ours = vitlora.load(run_dir).predict([str(f) for f in files], top_k=1)
    for row, pred in zip(plain_probs, ours):
        assert plain.config.id2label[int(row.argmax())] == pred.top_k[0][0]
        assert abs(float(row.max()) - pred.top_k[0][1]) < 1e-4

    merged = tmp_path / "merged"
    assert main(["merge", str(run_dir), str(merged)]) == 0
    clf = pipeline("image-classification", model=str(merged), device="cpu")
    for f, pred, row in zip(files, ours, plain_probs):
        top = clf(str(f), top_k=1)[0]
        assert top["label"] == pred.top_k[0][0]
        assert abs(top["score"] - float(row.max())) < 1e-3


def test_eval_matches_hand_computation(run_dir: Path, split, tmp_path: Path):
    import vitlora

    _, test = split
    out = tmp_path / "eval.json"
    assert main(["eval", str(run_dir), str(test), "--label", "raccoon", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    preds = vitlora.load(run_dir).predict(sorted(str(p) for p in test.iterdir()), top_k=5)
    top1 = [p.top_k[0][0] for p in preds]
    hits = sum(t == "raccoon" for t in top1)
    assert r["n_images"] == 30
    assert r["accuracy"] == pytest.approx(hits / 30)
    assert r["per_class"]["raccoon"]["recall"] == pytest.approx(hits / 30)
    assert r["per_class"]["raccoon"]["precision"] == pytest.approx(1.0 if hits else 0.0)  # every image is a raccoon
    assert r["top5_accuracy"] == pytest.approx(sum(any(l == "raccoon" for l, _ in p.top_k) for p in preds) / 30)
    assert r["macro_recall"] == pytest.approx(hits / 30)
    assert sum(r["confusion_matrix"]["matrix"][r["confusion_matrix"]["labels"].index("raccoon")]) == 30
