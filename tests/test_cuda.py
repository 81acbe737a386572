"""The training paths on a CUDA device (skipped without one; the lent-GPU check runs them).

Extend mode's linear probe once mixed CPU features with the head's CUDA rows and failed on every
GPU run ("Expected all tensors to be on the same device"); these runs go through every extend
path (negatives, stacking exemplars, out-of-fold refit) and replace mode with negatives on cuda,
and check the GPU run answers like the same run reloaded on the CPU.
"""

from __future__ import annotations

import json
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
