"""Shared fixtures: a tiny random ViT (fast), synthetic image folders, and the real shared assets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEIT = SHARED / "models" / "deit-tiny-patch16-224"
RACCOON = SHARED / "data" / "raccoon"

# base labels of the tiny model: the synthetic colour classes below are *not* among them,
# except "blue", so label matching in replace/extend mode is exercised.
TINY_BASE_LABELS = ["tench", "goldfish", "great white shark", "blue", "hen", "ostrich", "Red_Fox", "robin"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_tiny_model(path: Path, labels: list[str] = TINY_BASE_LABELS, seed: int = 0) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)},
    )
    model = ViTForImageClassification(config)
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }))
    return path


def plain_peft_model(base_model: Path | str, run_dir: Path):
    """A run reloaded the way the README shows, with plain transformers + peft only (no vitlora)."""
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    labels = json.loads((Path(run_dir) / "labels.json").read_text())
    id2label = {int(k): v for k, v in labels["id2label"].items()}
    base = AutoModelForImageClassification.from_pretrained(
        base_model, num_labels=len(id2label), id2label=id2label, label2id=labels["label2id"],
        ignore_mismatched_sizes=True)
    return PeftModel.from_pretrained(base, run_dir).eval()


def make_colour_images(folder: Path, colour: str, n: int, seed: int, size=(40, 36)) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = np.array(COLOURS[colour], dtype=np.float32)
    paths = []
    for i in range(n):
        noise = rng.normal(0, 25, size=(size[1], size[0], 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        p = folder / f"{colour}_{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-vit"))


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory) -> Path:
    """ImageFolder with three colour classes, 16 images each."""
    root = tmp_path_factory.mktemp("colours")
    for j, colour in enumerate(COLOURS):
        make_colour_images(root / colour, colour, 16, seed=j)
    return root


@pytest.fixture(scope="session")
def red_folder(tmp_path_factory) -> Path:
    """A flat folder of one class (for extend mode with --label)."""
    root = tmp_path_factory.mktemp("red-flat")
    make_colour_images(root, "red", 16, seed=7)
    return root


@pytest.fixture
def quiet_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return os.environ


def need_shared() -> None:
    if not (DEIT.is_dir() and RACCOON.is_dir()):
        pytest.skip("shared DeiT-tiny model / raccoon photos not present")
