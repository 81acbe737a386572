"""Exporting a trained run, as `vitlora export RUN OUT [--int8 | --format openvino]` and
`predict --onnx OUT` do: `export_run`, `open_export`, verification on the run's own photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vitlora.errors import VitloraError
from vitlora.export import OnnxPredictor, OpenVinoPredictor, export_onnx, export_run, open_export

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def replace_run_dir(tiny_model, colour_folder, tmp_path_factory) -> Path:
    """A one-epoch replace-mode run of the tiny model on the colour folder."""
    from vitlora.cli import main

    out = tmp_path_factory.mktemp("export-runs") / "colours"
    assert main(["train", str(colour_folder), "--model", str(tiny_model), "--out", str(out), "--epochs", "1",
                 "--quiet", "--val-split", "0.25"]) == 0
    return out


def test_int8_export_of_a_run_verified_on_its_training_photos(replace_run_dir, colour_folder, tmp_path):
    """The path `vitlora export RUN OUT --int8` takes: load the run, verify on its own photos."""
    from vitlora.data import Preprocess, expand_image_paths
    from vitlora.export.photos import photos, run_photos
    from vitlora.run import load

    run_dir = replace_run_dir
    run = load(run_dir, device="cpu", merge=True)
    images = run_photos(run.settings, run.preprocess, n=12)
    assert images.shape == (12, 3, 32, 32)
    all_files = expand_image_paths([str(colour_folder)])
    assert torch.equal(images, photos(all_files, run.preprocess, n=12))  # same pick, same pixels
    report = export_onnx(run.model, tmp_path / "int8", run.settings["processor"], verify_images=images, int8=True)
    assert report.int8 is not None and report.int8.n_images == 12
    rows = OnnxPredictor(report.path).predict_pixels(images[:3], top_k=1)
    assert {row[0][0] for row in rows} <= {"blue", "green", "red"}

    moved = dict(run.settings, config=dict(run.settings["config"], data=str(tmp_path / "gone")))
    with pytest.raises(VitloraError, match="training photos are needed"):
        run_photos(moved, Preprocess.from_pretrained(str(run_dir)))


def test_export_run_openvino_and_open_export(replace_run_dir, tmp_path):
    """What `vitlora export RUN OUT --format openvino` and `predict --onnx OUT` call."""
    pytest.importorskip("openvino")
    from vitlora.export.common import softmax as sm
    from vitlora.run import load

    report = export_run(replace_run_dir, tmp_path / "ov", "openvino")
    assert "OpenVINO IR" in report.describe() and "top-1 agree: True" in report.describe()
    predictor = open_export(report.path)
    assert isinstance(predictor, OpenVinoPredictor) and predictor.labels == ["blue", "green", "red"]
    run = load(replace_run_dir, device="cpu", precision="fp32")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = torch.softmax(run.model(pixel_values=pixels).logits.double(), -1).numpy()
    assert np.abs(sm(predictor.logits(pixels)) - expected).max() < 1e-4
    with pytest.raises(VitloraError, match="int8 is only offered for ONNX"):
        open_export(report.path, int8=True)
    with pytest.raises(VitloraError, match="int8 is only offered for the onnx format"):
        export_run(replace_run_dir, tmp_path / "x", "openvino", int8=True)
    with pytest.raises(VitloraError, match="unknown export format"):
        export_run(replace_run_dir, tmp_path / "y", "tflite")



def test_export_run_int8_and_verify_paths(replace_run_dir, colour_folder, tmp_path):
    report = export_run(replace_run_dir, tmp_path / "int8", int8=True)
    assert report.int8 is not None and report.int8.n_images == 48  # all 48 colour photos (< 64)
    assert "int8 model" in report.describe() and "of 48 photos" in report.describe()
    predictor = open_export(report.path)
    assert isinstance(predictor, OnnxPredictor) and predictor.model_file == "model.int8.onnx"
    blue = export_run(replace_run_dir, tmp_path / "fp32", verify_paths=[str(colour_folder / "blue")])
    assert blue.batch_sizes_checked == (16, 1, 17)
    assert open_export(blue.path).model_file == "model.onnx"
