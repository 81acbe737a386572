"""The training paths on a CUDA device (skipped without one; the lent-GPU check runs them).

Extend mode's linear probe once mixed CPU features with the head's CUDA rows and failed on every
GPU run ("Expected all tensors to be on the same device"); these runs go through every extend
path (negatives, stacking exemplars, out-of-fold refit) and replace mode with negatives on cuda,
and check the GPU run answers like the same run reloaded on the CPU.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_colour_images

from vitlora.cli import main
from vitlora.run import load

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FAST = ["--epochs", "2", "--batch-size", "8", "--lr", "5e-3", "--quiet", "--rank", "4", "--alpha", "8",
        "--device", "cuda"]


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def negs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("negs")
    make_colour_images(root / "g", "green", 12, seed=11)
    make_colour_images(root / "b", "blue", 12, seed=12)
    return root


def test_extend_with_negatives_then_stacked_on_cuda(tiny_model, red_folder, negs, tmp_path):
    first = tmp_path / "red"
    assert cli("train", red_folder, "--label", "raccoon", "--model", tiny_model, "--out", first,
               "--negatives", negs, "--val-split", "0.25", *FAST) == 0
    ext = json.loads((first / "vitlora.json").read_text())["extend"]
    assert ext["out_of_fold"]["n_negatives"] > 0 and (first / "exemplars.safetensors").is_file()
    more = tmp_path / "more"
    make_colour_images(more, "blue", 12, seed=21)
    second = tmp_path / "stacked"
    assert cli("train", more, "--label", "lemon", "--model", first, "--out", second, "--val-split", "0.25",
               *FAST) == 0
    assert json.loads((second / "vitlora.json").read_text())["extend"]["out_of_fold"]["n_exemplars"] > 0
    photos = sorted(str(p) for p in red_folder.iterdir())[:6]
    gpu, cpu = load(second, device="cuda"), load(second, device="cpu")
    a, b = gpu.predict(photos, top_k=3), cpu.predict(photos, top_k=3)
    assert [p.top_k[0][0] for p in a] == [p.top_k[0][0] for p in b]


def test_replace_with_negatives_on_cuda(tiny_model, colour_folder, negs, tmp_path):
    out = tmp_path / "run"
    assert cli("train", colour_folder, "--model", tiny_model, "--out", out, "--negatives", negs, *FAST) == 0
    labels = json.loads((out / "labels.json").read_text())
    assert labels["rejection"]["label"] == "unknown"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_replace_recipe_on_cuda_answers_like_the_cpu_reload(tiny_model, colour_folder, tmp_path, precision):
    # the recipe flags added since the first GPU check run on the device: 5/7-size training crops with
    # interpolated position embeddings (the default here), kornia's batched TrivialAugment, mixup,
    # random erasing, PatchDropout and EMA under fp16 / bf16 autocast; evaluation stays at full size
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli("train", colour_folder, "--model", tiny_model, "--out", out, "--augment", "trivial",
                   "--mixup", "0.2", "--random-erasing", "0.25", "--patch-keep", "0.75", "--ema", "0.9",
                   "--precision", precision, *FAST) == 0
    # fp16's first steps overflow and GradScaler skips them; the schedule waits for the optimizer
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    saved = json.loads((out / "vitlora.json").read_text())
    assert saved["config"]["train_size"] is None and saved["config"]["augment"] == "trivial"
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(e["val_loss"] == e["val_loss"] for e in metrics["epochs"])  # no NaN under autocast
    photos = sorted(str(p) for p in colour_folder.rglob("*.*"))[::3]
    gpu, cpu = load(out, device="cuda"), load(out, device="cpu")
    a, b = gpu.predict(photos, top_k=2), cpu.predict(photos, top_k=2)
    assert [p.top_k[0][0] for p in a] == [p.top_k[0][0] for p in b]
    assert max(abs(p.top_k[0][1] - q.top_k[0][1]) for p, q in zip(a, b)) < 1e-3


def test_extend_with_smaller_crops_on_cuda(tiny_model, red_folder, negs, tmp_path):
    out = tmp_path / "run"
    assert cli("train", red_folder, "--label", "raccoon", "--model", tiny_model, "--out", out, "--negatives", negs,
               "--train-size", "24", "--val-split", "0.25", *FAST) == 0
    assert json.loads((out / "vitlora.json").read_text())["config"]["train_size"] == 24
