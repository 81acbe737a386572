"""ONNX export (fp32): numerics vs PyTorch, dynamic batch, files written, atomicity, predictor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from vitlora.export import common, onnx_export
from vitlora.errors import VitloraError
from vitlora.export import ExportReport, OnnxPredictor, export_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

LABELS = ["cat", "dog", "raccoon", "fox", "owl"]
PREPROCESS = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": 32, "width": 32},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
DEIT = Path("/work/shared/models/deit-tiny-patch16-224")
RACCOON = Path("/work/shared/data/raccoon")


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    model = ViTForImageClassification(config).eval()
    # Random init gives near-uniform logits; sharpen the head so top-1 is meaningful.
    with torch.no_grad():
        model.classifier.weight.mul_(20)
    return model


def torch_probs(model: torch.nn.Module, pixels: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model(pixel_values=pixels).logits.double(), -1).numpy()


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> tuple[ViTForImageClassification, Path, ExportReport]:
    model = tiny_vit()
    out = tmp_path_factory.mktemp("exports") / "tiny-onnx"
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = export_onnx(model, out, PREPROCESS, verify_images=images)
    return model, out, report


@pytest.fixture
def reuse_tiny_graph(tiny_export, monkeypatch):
    """Skip the exporter (the slow part) by copying the fixture's graph; everything after it
    (files, verification against a fresh tiny_vit(), publishing) still runs for real."""
    source = tiny_export[1] / "model.onnx"
    monkeypatch.setattr(onnx_export, "_save_onnx", lambda model, example, path, opset: shutil.copyfile(source, path))


def test_report_and_files(tiny_export):
    model, out, report = tiny_export
    assert report.path == out.resolve()
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "model.onnx", "preprocessor_config.json"]
    assert report.n_labels == 5
    assert report.top1_agree is True
    assert 0.0 <= report.max_abs_prob_diff <= 1e-5
    assert report.opset == 20  # torch 2.13's default, read back from the file
    assert report.batch_sizes_checked == (4, 1, 5)
    # No temp or backup folders left next to the export.
    assert [p.name for p in out.parent.iterdir()] == ["tiny-onnx"]
    # Exporting must not change the caller's model.
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32


def test_labels_and_preprocessor_files(tiny_export):
    _, out, _ = tiny_export
    labels = json.loads((out / "labels.json").read_text())
    assert labels == {"id2label": {"0": "cat", "1": "dog", "2": "raccoon", "3": "fox", "4": "owl"}}
    assert list(labels["id2label"]) == ["0", "1", "2", "3", "4"]
    assert json.loads((out / "preprocessor_config.json").read_text()) == PREPROCESS


def test_graph_signature_has_dynamic_batch(tiny_export):
    import onnx

    _, out, _ = tiny_export
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert [o.name for o in graph.output] == ["logits"]
    in_dims = graph.input[0].type.tensor_type.shape.dim
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert in_dims[0].dim_param and not in_dims[0].dim_value
    assert [d.dim_value for d in in_dims[1:]] == [3, 32, 32]
    assert out_dims[0].dim_param == in_dims[0].dim_param
    assert out_dims[1].dim_value == 5


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_dynamic_batch_matches_pytorch(tiny_export, batch):
    model, out, _ = tiny_export
    predictor = OnnxPredictor(out)
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    logits = predictor.logits(pixels)
    assert logits.shape == (batch, 5)
    expected = torch_probs(model, pixels)
    got = common.softmax(logits)
    assert np.abs(got - expected).max() < 1e-5
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_predictor_topk_matches_pytorch(tiny_export):
    model, out, _ = tiny_export
    predictor = OnnxPredictor(out)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    expected = torch_probs(model, pixels)
    for as_numpy in (False, True):
        preds = predictor.predict_pixels(pixels.numpy() if as_numpy else pixels, top_k=3)
        assert len(preds) == 3
        for row, probs in zip(preds, expected, strict=True):
            order = np.argsort(-probs)[:3]
            assert [name for name, _ in row] == [LABELS[i] for i in order]
            assert np.allclose([p for _, p in row], probs[order], atol=1e-5)
            assert [p for _, p in row] == sorted((p for _, p in row), reverse=True)
    full = predictor.predict_pixels(pixels[:1], top_k=50)[0]
    assert len(full) == 5 and abs(sum(p for _, p in full) - 1.0) < 1e-6
    assert predictor.preprocess == PREPROCESS


def test_predictor_rejects_bad_input(tiny_export, tmp_path):
    _, out, _ = tiny_export
    predictor = OnnxPredictor(out)
    with pytest.raises(VitloraError, match="pixel_values must be shaped"):
        predictor.predict_pixels(np.zeros((1, 3, 64, 64), np.float32), top_k=1)
    with pytest.raises(VitloraError, match="top_k"):
        predictor.predict_pixels(np.zeros((1, 3, 32, 32), np.float32), top_k=0)
    with pytest.raises(VitloraError, match=r"labels\.json is missing"):
        (tmp_path / "model.onnx").write_bytes(b"")
        OnnxPredictor(tmp_path)


def test_missing_onnxruntime_is_a_user_error(tiny_export, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(VitloraError, match=r"pip install 'vitlora\[onnx\]'"):
        OnnxPredictor(tiny_export[1])


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    def half_write(model, example, path, opset):
        path.write_bytes(b"\x08\x07partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "_save_onnx", half_write)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_vit(), out, PREPROCESS)
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_discards_export(reuse_tiny_graph, tmp_path, monkeypatch):
    real_logits = OnnxPredictor.logits

    def skewed(self, pixel_values):
        logits = real_logits(self, pixel_values)
        logits[:, 0] += 0.01  # small enough to keep top-1, large enough to move probabilities
        return logits

    monkeypatch.setattr(OnnxPredictor, "logits", skewed)
    out = tmp_path / "out"
    with pytest.raises(VitloraError, match="does not match PyTorch"):
        export_onnx(tiny_vit(), out, PREPROCESS)
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite(reuse_tiny_graph, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("old")
    with pytest.raises(VitloraError, match="already exists"):
        export_onnx(tiny_vit(), out, PREPROCESS)
    assert (out / "model.onnx").read_text() == "old"

    other = tmp_path / "notes"
    other.mkdir()
    (other / "diary.txt").write_text("keep me")
    with pytest.raises(VitloraError, match="refusing"):
        export_onnx(tiny_vit(), other, PREPROCESS, overwrite=True)
    assert (other / "diary.txt").read_text() == "keep me"

    report = export_onnx(tiny_vit(), out, PREPROCESS, overwrite=True)
    assert report.path == out.resolve()
    assert (out / "model.onnx").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "out"]


def test_user_errors(tmp_path):
    model = tiny_vit()
    with pytest.raises(VitloraError, match="plain transformers model"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "a", PREPROCESS)  # type: ignore[arg-type]
    with pytest.raises(VitloraError, match="JSON"):
        export_onnx(model, tmp_path / "b", {"mean": object()})
    with pytest.raises(VitloraError, match="opset"):
        export_onnx(model, tmp_path / "c", PREPROCESS, opset=99)
    with pytest.raises(VitloraError, match="verify_images"):
        export_onnx(model, tmp_path / "d", PREPROCESS, verify_images=torch.zeros(2, 1, 32, 32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(not DEIT.is_dir() or not RACCOON.is_dir(), reason="shared DeiT-tiny or raccoon photos missing")
def test_real_deit_on_raccoon_photos(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(DEIT)
    model = ViTForImageClassification.from_pretrained(DEIT).eval()
    photos = sorted(RACCOON.glob("*.jpg"))[:4]
    assert len(photos) == 4
    pixels = processor(images=[Image.open(p).convert("RGB") for p in photos], return_tensors="pt")["pixel_values"]
    preprocess = json.loads((DEIT / "preprocessor_config.json").read_text())

    report = export_onnx(model, tmp_path / "deit-onnx", preprocess, verify_images=pixels)
    print(f"\nDeiT-tiny export: {report}")
    assert report.top1_agree and report.max_abs_prob_diff < 1e-4
    assert report.n_labels == 1000 and report.batch_sizes_checked == (4, 1, 5)

    predictor = OnnxPredictor(report.path)
    expected = torch_probs(model, pixels)
    got = common.softmax(predictor.logits(pixels))
    assert np.abs(got - expected).max() < 1e-4
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    top1 = [row[0][0] for row in predictor.predict_pixels(pixels, top_k=1)]
    assert top1 == [model.config.id2label[int(i)] for i in expected.argmax(-1)]
    assert predictor.preprocess == preprocess
