"""int8 ONNX export: the quantized model is written, checked against fp32, refused when it
disagrees, and picked by `OnnxPredictor` (tiny random ViT; one slow real DeiT-tiny check)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import DEIT, LABELS, PREPROCESS, tiny_vit

from vitlora.errors import VitloraError
from vitlora.export import OnnxPredictor, export_onnx
from vitlora.export import int8 as int8_mod
from vitlora.export.common import softmax

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

IMAGENET = DEIT.parents[1] / "data" / "imagenet-samples"


def photos(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    report = export_onnx(tiny_vit(), out, PREPROCESS, verify_images=photos(16, 3), int8=True)
    return out, report


def test_int8_folder_and_report(int8_export):
    out, report = int8_export
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "model.int8.onnx", "preprocessor_config.json"]
    assert report.int8 is not None and report.int8.n_images == 16
    assert report.int8.top1_agreement >= 0.99
    # The tiny model's weights are small next to its graph, so only "smaller" holds here;
    # the <= 0.40 figure is DeiT-tiny's (slow test below).
    assert 0.0 < report.int8.size_ratio < 1.0
    assert report.top1_agree and report.max_abs_prob_diff < 1e-5  # the fp32 graph it came from


def test_int8_graph_has_int8_weights(int8_export):
    import onnx

    model = onnx.load(str(int8_export[0] / "model.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 12  # 2 layers x (q, k, v, out, fc1, fc2)
    assert "Gemm" in ops  # the classifier stays fp32
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert len(int8_weights) == 12


def test_predictor_picks_int8_and_stays_close(int8_export):
    out, _ = int8_export
    predictor = OnnxPredictor(out)
    assert predictor.model_file == "model.int8.onnx"
    assert OnnxPredictor(out, int8=True).model_file == "model.int8.onnx"
    with pytest.raises(VitloraError, match="model.onnx is missing"):
        OnnxPredictor(out, int8=False)
    pixels = photos(5, 11)
    with torch.inference_mode():
        expected = torch.softmax(tiny_vit()(pixel_values=pixels).logits.double(), -1).numpy()
    got = softmax(predictor.logits(pixels))
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert 0 < np.abs(got - expected).max() < 0.05  # quantized: close, not identical
    top = predictor.predict_pixels(pixels, top_k=2)
    assert [row[0][0] for row in top] == [LABELS[i] for i in expected.argmax(-1)]


def test_fp32_folder_refuses_int8(tmp_path):
    out = tmp_path / "fp32"
    export_onnx(tiny_vit(), out, PREPROCESS)
    assert OnnxPredictor(out).model_file == "model.onnx"
    with pytest.raises(VitloraError, match="no int8 model"):
        OnnxPredictor(out, int8=True)


def test_int8_needs_real_photos(tmp_path):
    with pytest.raises(VitloraError, match="real photos"):
        export_onnx(tiny_vit(), tmp_path / "x", PREPROCESS, int8=True)
    assert list(tmp_path.iterdir()) == []


def test_disagreeing_int8_is_refused_and_nothing_written(tmp_path, monkeypatch):
    real = int8_mod.batched_logits
    calls = []

    def flip_int8(predictor, images, batch_size=32):
        logits = real(predictor, images, batch_size)
        calls.append(predictor.model_file)
        if predictor.model_file == "model.int8.onnx":
            logits[: len(logits) // 2] = -logits[: len(logits) // 2]  # half the top-1s change
        return logits

    monkeypatch.setattr(int8_mod, "batched_logits", flip_int8)
    out = tmp_path / "out"
    with pytest.raises(VitloraError, match=r"agrees with fp32 on only \d+\.\d % of 16 photos"):
        export_onnx(tiny_vit(), out, PREPROCESS, verify_images=photos(16, 3), int8=True)
    assert calls == ["model.onnx", "model.int8.onnx"]
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_an_int8_export(int8_export, tmp_path):
    out = tmp_path / "again"
    export_onnx(tiny_vit(), out, PREPROCESS, verify_images=photos(4, 5), int8=True)
    report = export_onnx(tiny_vit(), out, PREPROCESS, verify_images=photos(4, 5), overwrite=True)
    assert report.int8 is None and OnnxPredictor(out).model_file == "model.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


@pytest.mark.slow
@pytest.mark.skipif(not DEIT.is_dir() or not IMAGENET.is_dir(), reason="shared DeiT-tiny or ImageNet photos missing")
def test_real_deit_int8_is_small_and_agrees(tmp_path):
    from transformers import ViTForImageClassification

    from vitlora.data import Preprocess, expand_image_paths
    from vitlora.export.photos import photos

    # The base model's own kind of photos (ImageNet), as `export --int8` uses a run's training photos.
    pixels = photos(expand_image_paths([str(IMAGENET)]), Preprocess.from_pretrained(str(DEIT)), n=128)
    model = ViTForImageClassification.from_pretrained(DEIT).eval()
    preprocess = json.loads((DEIT / "preprocessor_config.json").read_text())
    report = export_onnx(model, tmp_path / "deit-int8", preprocess, verify_images=pixels, int8=True)
    print(f"\nDeiT-tiny int8: {report.int8}")
    assert report.int8 is not None and report.int8.n_images == 128
    assert report.int8.size_ratio <= 0.40
    assert report.int8.top1_agreement >= 0.99
    assert Path(report.path, "model.int8.onnx").stat().st_size < 10_000_000

