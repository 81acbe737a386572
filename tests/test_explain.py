"""Explanations: geometry back onto the photo, overlay files, and faithfulness on the real DeiT-tiny."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlora.data import Preprocess, resize_for_eval
from vitlora.errors import VitloraError
from vitlora.explain import explain_files, explain_image, heat_to_photo, overlay_names, write_overlay

from conftest import DEIT, RACCOON, need_shared

_COMMON = dict(mean=(0.5,) * 3, std=(0.5,) * 3, resample=2)
GEOMETRIES = {
    "squash": Preprocess(224, 224, **_COMMON),
    "resize-256-crop-224": Preprocess(224, 224, resize_size=(256, 256), **_COMMON),
    "short-side-256-crop-224": Preprocess(224, 224, resize_mode="shortest_edge", shortest_edge=256, **_COMMON),
}


def _centre_of_mass(heat: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[: heat.shape[0], : heat.shape[1]]
    return float((xs * heat).sum() / heat.sum()), float((ys * heat).sum() / heat.sum())


@pytest.mark.parametrize("name", GEOMETRIES)
@pytest.mark.parametrize("box", [(120, 40, 170, 90), (240, 150, 290, 200)])
def test_heat_lands_where_the_crop_saw_the_object(name: str, box: tuple[int, int, int, int]):
    """A white square in a 400x240 photo -> eval crop -> per-patch brightness -> back: same place."""
    pp = GEOMETRIES[name]
    photo = np.zeros((240, 400, 3), np.uint8)
    photo[box[1] : box[3], box[0] : box[2]] = 255
    crop = resize_for_eval(Image.fromarray(photo), pp).float().mean(0)  # what the model sees
    grid = crop.reshape(14, 16, 14, 16).mean(dim=(1, 3)) / 255  # 16-px patches
    heat = heat_to_photo(grid, (400, 240), pp)
    assert heat.shape == (240, 400) and 0 <= heat.min() and heat.max() <= 1
    cx, cy = _centre_of_mass(heat)
    assert abs(cx - (box[0] + box[2]) / 2) < 10 and abs(cy - (box[1] + box[3]) / 2) < 10
    if name == "short-side-256-crop-224":  # the crop keeps only the middle 224/256 of the short side
        assert heat[:, :90].max() == 0 and heat[:, -90:].max() == 0


@pytest.fixture(scope="module")
def tiny_run(tiny_model, colour_folder, tmp_path_factory) -> Path:
    from vitlora.cli import main

    out = tmp_path_factory.mktemp("runs") / "colours"
    args = ["train", colour_folder, "--model", tiny_model, "--out", out, "--val-split", "0.25", "--epochs", "1",
            "--batch-size", "8", "--quiet", "--rank", "4", "--alpha", "8"]
    assert main([str(a) for a in args]) == 0
    return out


def test_explain_files_writes_one_overlay_per_photo(tiny_run: Path, colour_folder: Path, tmp_path: Path):
    from vitlora.run import load

    run = load(tiny_run, precision="fp32")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sizes = {"a/shot.png": (90, 50), "b/shot.png": (40, 70)}  # same stem, different shapes
    for rel, size in sizes.items():
        Image.open(next((colour_folder / "red").glob("*.png"))).convert("RGB").resize(size).save(tmp_path / rel)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    paths = [str(tmp_path / rel) for rel in sizes] + [str(tmp_path / "broken.jpg")]
    skipped: list[tuple[str, str]] = []
    written = explain_files(run, paths, tmp_path / "why", skipped)
    assert sorted(Path(p).name for p in written.values()) == ["shot-2.png", "shot.png"]
    for rel, size in sizes.items():
        assert Image.open(written[str(tmp_path / rel)]).size == size  # the photo's own size
    assert [p for p, _ in skipped] == [str(tmp_path / "broken.jpg")]
    first = paths[0]
    for label in ("red", "green"):  # the label predict reported is the one explained
        explain_files(run, [first], tmp_path / label, labels={first: label})
    assert (tmp_path / "red" / "shot.png").read_bytes() != (tmp_path / "green" / "shot.png").read_bytes()


def test_unmerged_adapter_explains_like_the_merged_one(tiny_run: Path, colour_folder: Path):
    from vitlora.run import load

    photo = Image.open(next((colour_folder / "green").glob("*.jpg")))
    merged, label = explain_image(load(tiny_run, precision="fp32"), photo)
    unmerged_run = load(tiny_run, precision="fp32", merge=False)
    with torch.inference_mode():  # as a server's worker thread may call it
        unmerged, label2 = explain_image(unmerged_run, photo)
    assert label == label2 and merged.max() == pytest.approx(1.0)
    np.testing.assert_allclose(merged, unmerged, atol=1e-3)


def test_user_mistakes_are_one_line_errors(tiny_run: Path, colour_folder: Path, tmp_path: Path):
    from vitlora.run import load

    run = load(tiny_run, precision="fp32")
    photo = Image.open(next((colour_folder / "red").glob("*.jpg")))
    with pytest.raises(VitloraError, match="unknown label"):
        explain_image(run, photo, label="zebra")
    (tmp_path / "file").write_text("x")
    with pytest.raises(VitloraError, match="not a folder"):
        explain_files(run, [str(next((colour_folder / "red").glob("*.jpg")))], tmp_path / "file")


def test_overlay_names_are_unique_and_overlay_keeps_the_photo():
    names = overlay_names(["a/x.jpg", "b/x.png", "c/X.jpg", "x-2.jpg", "y.jpg"])
    assert len(set(n.lower() for n in names.values())) == 5
    assert names["a/x.jpg"] == "x.png" and names["y.jpg"] == "y.png"


def test_overlay_is_the_photo_where_heat_is_zero(tmp_path: Path):
    photo = Image.new("RGB", (30, 20), (10, 200, 30))
    heat = np.zeros((20, 30), np.float32)
    heat[:, 15:] = 1.0
    out = np.asarray(Image.open(write_overlay(tmp_path / "o.png", photo, heat)), dtype=int)
    cold, hot = out[0, 0], out[0, -1]
    assert out.shape == (20, 30, 3) and not np.array_equal(cold, hot)
    assert np.array_equal(cold, np.asarray(photo)[0, 0])  # no heat: the photo untinted
    assert hot[0] > cold[0] + 50 and hot[1] < cold[1] - 50  # full heat: jet's dark red over the green


@pytest.mark.slow
def test_heat_follows_the_pasted_object_on_deit():
    """Faithfulness: a raccoon and a tench on one canvas, then swapped; each class's heat follows its photo."""
    need_shared()
    from transformers import ViTForImageClassification

    from vitlora.run import Run

    model = ViTForImageClassification.from_pretrained(DEIT).eval()
    run = Run(DEIT, model, dict(model.config.id2label), Preprocess.from_pretrained(str(DEIT)), settings={})
    raccoon = Image.open(RACCOON / "raccoon-3.jpg").convert("RGB").resize((150, 120))
    tench = Image.open(DEIT.parents[1] / "data" / "imagenet-samples" / "n01440764_tench.JPEG").convert("RGB")
    tench = tench.resize((150, 120))
    for at_raccoon, at_tench in [((20, 20), (230, 140)), ((230, 140), (20, 20))]:
        canvas = Image.new("RGB", (400, 280), (128, 128, 128))
        canvas.paste(raccoon, at_raccoon)
        canvas.paste(tench, at_tench)
        for label, (x, y) in [(None, at_raccoon), ("tench", at_tench)]:
            heat, explained = explain_image(run, canvas, label)
            assert heat.shape == (280, 400)
            assert label is not None or explained != "tench"  # top-1 is a raccoon look-alike
            inside = heat[y : y + 120, x : x + 150].sum() / heat.sum()
            cx, cy = _centre_of_mass(heat)
            assert inside > 0.8, (explained, inside)
            assert x < cx < x + 150 and y < cy < y + 120
    assert not torch.is_grad_enabled() or all(p.grad is None for p in model.parameters())


def test_predict_explain_through_the_cli(tiny_run: Path, colour_folder: Path, tmp_path: Path):
    """`vitlora predict RUN IMAGES --explain DIR --json`: one overlay per photo, named in its row, photo-sized."""
    from PIL import Image

    from vitlora.cli import main

    rows_file, why = tmp_path / "rows.json", tmp_path / "why"
    photos = sorted((colour_folder / "red").iterdir())[:3]
    assert main(["predict", str(tiny_run), *map(str, photos), "--explain", str(why), "--json", str(rows_file)]) == 0
    rows = json.loads(rows_file.read_text())
    assert len(rows) == 3
    for row in rows:
        overlay = Path(row["explanation"])
        assert overlay.parent == why and overlay.is_file()
        with Image.open(row["path"]) as photo, Image.open(overlay) as heat:
            assert heat.size == photo.size
    assert main(["predict", str(tiny_run), str(photos[0]), "--onnx", str(tmp_path), "--explain", str(why)]) == 2
