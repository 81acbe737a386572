"""Replace mode with --negatives: outlier exposure, the "unknown" row, and every consumer agreeing on it.

Also the temperature every replace-mode run folds into its head (vitlora.calibration), unit-tested.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import plain_peft_model

from vitlora.calibration import (
    append_unknown_row,
    fit_temperature,
    fold_temperature,
    outlier_exposure_loss,
    unknown_bias,
)
from vitlora.cli import main

FAST = ["--epochs", "3", "--batch-size", "8", "--lr", "5e-3", "--quiet", "--rank", "4", "--alpha", "8",
        "--precision", "fp32"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


# ---- pure functions ----------------------------------------------------------------------


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 5, generator=g) * 3
    y = torch.multinomial(torch.softmax(z / 2.0, -1), 1, generator=g).squeeze(1)  # labels drawn at T = 2
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.0, rel=0.1)
    nll = lambda tt: float(F.cross_entropy(z / tt, y))  # noqa: E731
    assert nll(t) <= min(nll(t * 0.9), nll(t * 1.1))


def test_fold_temperature_divides_logits_exactly():
    head = torch.nn.Linear(6, 3)
    x = torch.randn(4, 6)
    before = head(x).detach()
    fold_temperature(head, 2.5)
    assert torch.allclose(head(x), before / 2.5, atol=1e-6)


def test_outlier_exposure_is_cross_entropy_to_uniform():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = -(torch.log_softmax(z, -1)).mean(-1)
    assert torch.allclose(outlier_exposure_loss(z), expected, atol=1e-6)
    assert float(outlier_exposure_loss(z)[1]) == pytest.approx(math.log(3), abs=1e-6)  # its minimum: uniform


def test_unknown_row_wins_exactly_below_its_bias():
    head = torch.nn.Linear(4, 3)
    x = torch.randn(50, 4)
    logits = head(x).detach()
    b = unknown_bias(logits, 0.8)
    assert float((logits.max(-1).values > b).float().mean()) >= 0.8
    append_unknown_row(head, b)
    out = head(x).detach()
    assert out.shape == (50, 4) and torch.allclose(out[:, :3], logits)
    assert torch.allclose(out[:, 3], torch.full((50,), b))
    assert torch.equal(out.argmax(-1) == 3, logits.max(-1).values < b)


# ---- through the CLI ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def off_task(tmp_path_factory) -> Path:
    """Photos of none of the task's colours: black/white noise images (not red, green or blue)."""
    from PIL import Image
    import numpy as np

    root = tmp_path_factory.mktemp("off")
    rng = np.random.default_rng(5)
    for sub, level in (("dark", 20), ("light", 235)):
        (root / sub).mkdir()
        for i in range(12):
            arr = np.clip(level + rng.normal(0, 20, (36, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / sub / f"{sub}_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def reject_run(tiny_model, colour_folder, off_task, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rej") / "run"
    assert run_cli("train", colour_folder, "--model", tiny_model, "--negatives", off_task, "--out", out,
                   "--val-split", "0.25", *FAST) == 0
    return out


def test_replace_run_with_negatives_records_temperature_and_unknown(reject_run: Path):
    labels = json.loads((reject_run / "labels.json").read_text())
    assert labels["id2label"]["3"] == "unknown" and labels["rejection"]["id"] == 3
    meta = json.loads((reject_run / "vitlora.json").read_text())
    cal = meta["calibration"]
    assert cal["temperature"] > 0 and cal["n_images"] == 12  # 25 % of 48
    assert cal["rejection"]["n_val"] == 12 and cal["rejection"]["val_kept"] >= 0.9
    assert "auroc" in cal["rejection"]
    metrics = json.loads((reject_run / "metrics.json").read_text())
    assert metrics["calibration"]["temperature"] == cal["temperature"]


def test_predict_marks_rejected_rows_in_json_csv_and_table(reject_run: Path, off_task: Path, colour_folder: Path,
                                                           tmp_path: Path, capsys):
    js, cs = tmp_path / "p.json", tmp_path / "p.csv"
    assert run_cli("predict", reject_run, off_task, colour_folder / "red", "--json", js, "--precision", "fp32") == 0
    rows = json.loads(js.read_text())
    assert all(isinstance(r["rejected"], bool) for r in rows)
    assert all(r["rejected"] == (r["top_k"][0]["label"] == "unknown") for r in rows)
    off = [r for r in rows if "dark_" in r["path"] or "light_" in r["path"]]
    red = [r for r in rows if "red_" in r["path"]]
    assert sum(r["rejected"] for r in off) > sum(r["rejected"] for r in red)  # it learned something
    assert run_cli("predict", reject_run, off_task / "dark", "--csv", cs, "--precision", "fp32") == 0
    table = list(csv.DictReader(cs.open()))
    assert all(t["rejected"] in ("true", "false") for t in table)
    assert [t["rejected"] == "true" for t in table] == [r["rejected"] for r in off if "dark_" in r["path"]]
    capsys.readouterr()
    rejected = next(r for r in off if r["rejected"])
    assert run_cli("predict", reject_run, rejected["path"]) == 0
    assert "1. unknown" in capsys.readouterr().out


def test_unknown_agrees_across_plain_peft_merge_and_onnx(reject_run: Path, tiny_model: Path, off_task: Path,
                                                          tmp_path: Path):
    from PIL import Image
    from transformers import pipeline

    import vitlora
    from vitlora.data import normalize, resize_for_eval

    plain = plain_peft_model(tiny_model, reject_run)
    run = vitlora.load(reject_run, merge=True)
    files = sorted((off_task / "dark").iterdir())[:4] + sorted((off_task / "light").iterdir())[:4]
    x = normalize(torch.stack([resize_for_eval(Image.open(f).convert("RGB"), run.preprocess) for f in files]),
                  run.preprocess)
    with torch.no_grad():
        ref = plain(pixel_values=x).logits
    assert ref.shape[1] == 4 and torch.allclose(run.logits(x), ref, atol=1e-4)
    merged = tmp_path / "merged"
    assert run_cli("merge", reject_run, merged) == 0
    clf = pipeline("image-classification", model=str(merged), device="cpu")
    for f, probs in zip(files, torch.softmax(ref, -1)):
        top = clf(str(f), top_k=1)[0]
        assert top["label"] == plain.config.id2label[int(probs.argmax())]
        assert top["score"] == pytest.approx(float(probs.max()), abs=1e-3)
    pytest.importorskip("onnxruntime")
    onnx_dir, a, b = tmp_path / "onnx", tmp_path / "a.json", tmp_path / "b.json"
    assert run_cli("export", reject_run, onnx_dir, "--format", "onnx") == 0
    assert run_cli("predict", reject_run, off_task, "--precision", "fp32", "--json", a) == 0
    assert run_cli("predict", reject_run, off_task, "--onnx", onnx_dir, "--json", b) == 0
    for t, o in zip(json.loads(a.read_text()), json.loads(b.read_text())):
        assert t["top_k"][0]["label"] == o["top_k"][0]["label"] and t["rejected"] == o["rejected"]
        assert abs(t["top_k"][0]["score"] - o["top_k"][0]["score"]) < 1e-4


def test_eval_reports_ece_reliability_png_and_rejection(reject_run: Path, colour_folder: Path, off_task: Path,
                                                         tmp_path: Path, capsys):
    out = tmp_path / "eval.json"
    assert run_cli("eval", reject_run, colour_folder, "--negatives", off_task, "--json", out) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert 0 <= r["ece"] <= 1 and "ece" in printed and 0 < r["ece_if_calibrated"] < 1 and "ece_if_calibrated" in printed
    assert 0 <= r["rejection_auroc"] <= 1 and 0 <= r["fpr_at_95_tpr"] <= 1 and r["n_negatives"] == 24
    assert 0 <= r["negatives_rejected"] <= 1 and 0 <= r["in_task_rejected"] <= 1
    # by hand: max logit over the 3 task classes ("unknown", id 3, left out), in-task vs off-task
    import vitlora
    from vitlora.data import discover, expand_image_paths, load_rgb, normalize, resize_for_eval
    from vitlora.metrics import auroc

    run = vitlora.load(reject_run, precision="fp32")

    def logits(paths):
        x = torch.stack([resize_for_eval(load_rgb(str(p)), run.preprocess) for p in paths])
        return run.logits(normalize(x, run.preprocess))

    pos = logits([s.path for s in discover(str(colour_folder)).samples])
    neg = logits(expand_image_paths([str(off_task)]))
    assert r["rejection_auroc"] == pytest.approx(auroc(pos[:, :3].max(-1).values, neg[:, :3].max(-1).values), abs=1e-6)
    assert r["negatives_rejected"] == pytest.approx(float((neg.argmax(-1) == 3).float().mean()))
    png = out.with_suffix(".reliability.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(b["count"] for b in r["reliability"]) == r["n_images"] == 48


def test_plain_replace_run_folds_a_temperature(tiny_model: Path, colour_folder: Path, tmp_path: Path):
    """Without --negatives: no "unknown", but T is fitted on the validation split; --no-calibrate keeps T = 1."""
    import vitlora
    from vitlora.evaluation import evaluate

    runs = {}
    for name, extra in (("cal", []), ("raw", ["--no-calibrate"])):
        runs[name] = tmp_path / name
        assert run_cli("train", colour_folder, "--model", tiny_model, "--out", runs[name], "--val-split", "0.25",
                       *FAST, *extra) == 0
    cal = json.loads((runs["cal"] / "vitlora.json").read_text())["calibration"]
    assert json.loads((runs["raw"] / "vitlora.json").read_text())["calibration"]["temperature"] is None
    assert "unknown" not in json.loads((runs["cal"] / "labels.json").read_text())["label2id"]
    t = cal["temperature"]
    a, b = vitlora.load(runs["cal"]), vitlora.load(runs["raw"])
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(a.logits(x) * t, b.logits(x), atol=1e-3 * max(1.0, t))  # same training, head / T
    assert evaluate(a, str(colour_folder))["accuracy"] == evaluate(b, str(colour_folder))["accuracy"]
