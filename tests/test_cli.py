"""The CLI as a user runs it, on a tiny random ViT and synthetic colour photos (fast)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import plain_peft_model

from vitlora.cli import main

FAST = ["--epochs", "3", "--batch-size", "8", "--lr", "5e-3", "--quiet", "--rank", "4", "--alpha", "8"]


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def replace_run(tiny_model, colour_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "colours"
    # fp32: the recorded validation loss is compared with `vitlora eval` (fp32) to 1e-4, which bf16 would not hold
    assert run_cli("train", colour_folder, "--model", tiny_model, "--out", out, "--val-split", "0.25",
                   "--precision", "fp32", *FAST) == 0
    return out


def test_replace_run_directory_contract(replace_run: Path):
    names = {p.name for p in replace_run.iterdir()}
    for required in ("adapter_config.json", "adapter_model.safetensors", "labels.json", "preprocessor_config.json",
                     "vitlora.json", "metrics.json", "training_curves.png", "README.md"):
        assert required in names, required
    meta = json.loads((replace_run / "vitlora.json").read_text())
    assert meta["mode"] == "replace"
    assert meta["config"]["rank"] == 4 and meta["target_modules"] == ["q_proj", "v_proj"]
    labels = json.loads((replace_run / "labels.json").read_text())
    assert labels["id2label"] == {"0": "blue", "1": "green", "2": "red"}
    metrics = json.loads((replace_run / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    for e in metrics["epochs"]:
        assert e["train_loss"] > 0 and 0 <= e["val_accuracy"] <= 1 and e["images_per_s"] > 0 and e["wall_s"] > 0
    best = max(metrics["epochs"], key=lambda e: e["val_accuracy"])
    assert metrics["best_val_accuracy"] == best["val_accuracy"]
    assert (replace_run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    adapter_cfg = json.loads((replace_run / "adapter_config.json").read_text())
    assert adapter_cfg["modules_to_save"] == ["classifier"] and adapter_cfg["r"] == 4


def test_best_epoch_is_most_accurate_then_lowest_val_loss(replace_run: Path, colour_folder: Path, tmp_path: Path):
    """Ties on validation accuracy (common with small validation sets) go to the lower validation loss,
    and the adapter on disk is that epoch's: `vitlora eval` on the held-out photos gives its recorded loss."""
    import shutil

    from vitlora.data import discover, stratified_split

    m = json.loads((replace_run / "metrics.json").read_text())
    top = max(e["val_accuracy"] for e in m["epochs"])
    expected = min((e for e in m["epochs"] if e["val_accuracy"] == top), key=lambda e: (e["val_loss"], e["epoch"]))
    assert m["best_epoch"] == expected["epoch"]
    _, held_out = stratified_split(discover(str(colour_folder)).samples, 0.25, 0)  # the run's split (seed 0)
    val = tmp_path / "val"
    for sample in held_out:
        (val / sample.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.path, val / sample.label / Path(sample.path).name)
    out = tmp_path / "eval.json"
    assert run_cli("eval", replace_run, val, "--json", out) == 0
    r = json.loads(out.read_text())
    assert r["n_images"] == len(held_out)
    assert r["accuracy"] == pytest.approx(expected["val_accuracy"])
    assert r["nll"] == pytest.approx(expected["val_loss"], abs=1e-4)


def test_colour_classes_are_learned(replace_run: Path, colour_folder: Path, tmp_path: Path):
    out = tmp_path / "eval.json"
    assert run_cli("eval", replace_run, colour_folder, "--json", out) == 0
    r = json.loads(out.read_text())
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "nll", "top5_accuracy", "per_class",
                "confusion_matrix", "n_images"):
        assert key in r, key
    assert r["n_images"] == 48
    assert r["accuracy"] >= 0.9  # solid colours are easy even for a random tiny ViT + LoRA + head
    assert sum(map(sum, r["confusion_matrix"]["matrix"])) == 48


def test_eval_matches_hand_computation(replace_run: Path, colour_folder: Path, tmp_path: Path):
    import vitlora
    from vitlora.data import discover

    run = vitlora.load(replace_run)
    result = vitlora.evaluate(run, str(colour_folder))
    samples = discover(str(colour_folder)).samples
    preds = run.predict([s.path for s in samples], top_k=1)
    by_path = {p.path: p.top_k[0][0] for p in preds}
    correct = sum(by_path[s.path] == s.label for s in samples)
    assert result["accuracy"] == pytest.approx(correct / len(samples))
    for label in ("red", "green", "blue"):
        tp = sum(by_path[s.path] == label and s.label == label for s in samples)
        predicted = sum(v == label for v in by_path.values())
        assert result["per_class"][label]["precision"] == pytest.approx(tp / predicted if predicted else 0.0)
        assert result["per_class"][label]["recall"] == pytest.approx(tp / 16)


def test_predict_json_csv_and_table(replace_run: Path, colour_folder: Path, tmp_path: Path, capsys):
    js, cs = tmp_path / "p.json", tmp_path / "p.csv"
    assert run_cli("predict", replace_run, colour_folder / "red", "--top-k", "2", "--json", js) == 0
    rows = json.loads(js.read_text())
    assert len(rows) == 16
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["score"] >= r["top_k"][1]["score"] for r in rows)
    assert sum(r["top_k"][0]["label"] == "red" for r in rows) >= 14
    assert run_cli("predict", replace_run, str(colour_folder / "green" / "*.png"), "--csv", cs) == 0
    table = list(csv.DictReader(cs.open()))
    assert len(table) == 8 and set(table[0]) >= {"path", "label_1", "score_1", "label_5"}
    capsys.readouterr()
    assert run_cli("predict", replace_run, colour_folder / "blue" / "blue_000.jpg") == 0
    printed = capsys.readouterr().out
    assert "blue_000.jpg" in printed and "1. blue" in printed


def test_reload_with_plain_peft_gives_identical_predictions(replace_run: Path, tiny_model: Path, colour_folder):
    import vitlora
    from vitlora.data import normalize, resize_for_eval
    from PIL import Image

    plain = plain_peft_model(tiny_model, replace_run)
    run = vitlora.load(replace_run, merge=False)
    merged = vitlora.load(replace_run, merge=True)
    files = sorted((colour_folder / "green").iterdir())[:6]
    x = normalize(torch.stack([resize_for_eval(Image.open(f).convert("RGB"), run.preprocess) for f in files]),
                  run.preprocess)
    with torch.no_grad():
        ref = plain(pixel_values=x).logits
    assert torch.allclose(run.logits(x), ref, atol=1e-5)
    assert torch.allclose(merged.logits(x), ref, atol=1e-4)


def test_merge_loads_in_pipeline(replace_run: Path, colour_folder: Path, tmp_path: Path):
    from transformers import pipeline

    import vitlora

    out = tmp_path / "merged"
    assert run_cli("merge", replace_run, out) == 0
    assert (out / "config.json").is_file() and (out / "preprocessor_config.json").is_file()
    clf = pipeline("image-classification", model=str(out), device="cpu")
    run = vitlora.load(replace_run)
    files = [str(p) for p in sorted((colour_folder / "red").iterdir())[:5]]
    ours = run.predict(files, top_k=3)
    for f, mine in zip(files, ours):
        theirs = clf(f, top_k=3)
        assert theirs[0]["label"] == mine.top_k[0][0]
        assert abs(theirs[0]["score"] - mine.top_k[0][1]) < 1e-3
    # merging into an existing non-empty folder needs --overwrite
    assert run_cli("merge", replace_run, out) == 2


def test_info(replace_run: Path, capsys):
    assert run_cli("info", replace_run, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_labels"] == 3 and info["lora"]["r"] == 4
    assert 0 < info["trainable_params"] < info["total_params"]
    assert run_cli("info", replace_run) == 0
    assert "trainable params:" in capsys.readouterr().out


def test_extend_flat_folder_keeps_base_classes(tiny_model: Path, red_folder: Path, tmp_path: Path):
    import vitlora

    out = tmp_path / "ext"
    assert run_cli("train", red_folder, "--label", "raccoon", "--model", tiny_model, "--out", out, *FAST) == 0
    labels = json.loads((out / "labels.json").read_text())
    assert labels["mode"] == "extend" and labels["new_labels"] == ["raccoon"]
    assert len(labels["id2label"]) == 9 and labels["id2label"]["8"] == "raccoon"
    run = vitlora.load(out)
    assert run.labels[:8] == ["tench", "goldfish", "great white shark", "blue", "hen", "ostrich", "Red_Fox", "robin"]


def test_same_seed_same_metrics(tiny_model, colour_folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert run_cli("train", colour_folder, "--model", tiny_model, "--out", out, "--epochs", "2",
                       "--batch-size", "8", "--quiet", "--seed", "3") == 0
    ma = json.loads((a / "metrics.json").read_text())["epochs"]
    mb = json.loads((b / "metrics.json").read_text())["epochs"]
    assert [(e["train_loss"], e["val_loss"]) for e in ma] == [(e["train_loss"], e["val_loss"]) for e in mb]


def test_resume_continues_to_the_same_result(tiny_model, colour_folder, tmp_path):
    import vitlora
    from vitlora.config import TrainConfig

    full = tmp_path / "full"
    cut = tmp_path / "cut"
    common = dict(data=str(colour_folder), model=str(tiny_model), epochs=3, batch_size=8, seed=1, val_split=0.25)
    vitlora.train(TrainConfig(out=str(full), **common), progress=False)

    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vitlora.train(TrainConfig(out=str(cut), **common), progress=False, on_epoch_end=interrupt)
    staging = tmp_path / ".cut.staging"  # finished epochs wait beside --out; --out gets only a complete run
    assert not cut.exists() and (staging / "checkpoints" / "last" / "state.pt").is_file()
    assert len(json.loads((staging / "metrics.json").read_text())["epochs"]) == 2
    assert run_cli("train", colour_folder, "--out", cut, "--resume", "--quiet", "--epochs", "3") == 0
    a = json.loads((full / "metrics.json").read_text())["epochs"]
    b = json.loads((cut / "metrics.json").read_text())["epochs"]
    assert not staging.exists()
    assert [e["train_loss"] for e in a] == pytest.approx([e["train_loss"] for e in b], abs=1e-6)
    assert [e["val_loss"] for e in a] == pytest.approx([e["val_loss"] for e in b], abs=1e-6)


def test_export_onnx_and_predict_with_it(replace_run: Path, colour_folder: Path, tmp_path: Path):
    onnx_dir, a, b = tmp_path / "onnx", tmp_path / "a.json", tmp_path / "b.json"
    assert run_cli("export", replace_run, onnx_dir, "--format", "onnx") == 0
    assert (onnx_dir / "model.onnx").is_file() and (onnx_dir / "labels.json").is_file()
    # fp32: ONNX runs fp32, and `--precision auto` is bf16 on CPUs with bf16 units (1e-4 would not hold)
    assert run_cli("predict", replace_run, colour_folder / "blue", "--precision", "fp32", "--json", a) == 0
    assert run_cli("predict", replace_run, colour_folder / "blue", "--onnx", onnx_dir, "--json", b) == 0
    torch_rows, onnx_rows = json.loads(a.read_text()), json.loads(b.read_text())
    assert [r["path"] for r in torch_rows] == [r["path"] for r in onnx_rows]
    for t, o in zip(torch_rows, onnx_rows):
        assert t["top_k"][0]["label"] == o["top_k"][0]["label"]
        assert abs(t["top_k"][0]["score"] - o["top_k"][0]["score"]) < 1e-4


def test_train_help_lists_the_recipe_flags_with_their_defaults(capsys):
    with pytest.raises(SystemExit):
        run_cli("train", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--augment", "basic"), ("--mixup", "0"), ("--cutmix", "0"), ("--random-erasing", "0"),
                          ("--ema", "0"), ("--class-weights", "none"), ("--method", "lora"),
                          ("--auto-stop", "2")):
        entry = text.split(f" {flag} {flag[2:].upper().replace('-', '_')} ")[-1]  # the option's help line on
        assert entry.split("(default ", 1)[1].startswith(default + ")"), flag
    assert "--balanced-sampler" in text and "--report-to" in text
    assert "Default: 0.5 on a ViT / DeiT in a first extension of one class without --negatives" in text  # --patch-keep's rule
