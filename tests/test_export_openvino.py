"""OpenVINO export: verified against PyTorch like the ONNX export, fp32 on every CPU,
`OpenVinoPredictor` with `OnnxPredictor`'s interface (tiny random ViT; one slow real DeiT-tiny check)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_export import DEIT, LABELS, PREPROCESS, RACCOON, tiny_vit, torch_probs

from vitlora.errors import VitloraError
from vitlora.export import OnnxPredictor, OpenVinoPredictor, export_onnx, export_openvino
from vitlora.export import openvino_export as ov_mod
from vitlora.export.common import softmax

pytest.importorskip("openvino")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def ov_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "tiny-ov"
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return out, export_openvino(tiny_vit(), out, PREPROCESS, verify_images=images)


def test_files_and_report(ov_export):
    out, report = ov_export
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "model.bin", "model.xml", "preprocessor_config.json"]
    assert report.path == out.resolve() and report.n_labels == 5
    assert report.top1_agree and 0.0 <= report.max_abs_prob_diff <= 1e-5
    assert report.batch_sizes_checked == (4, 1, 5)
    assert [p.name for p in out.parent.iterdir()] == ["tiny-ov"]  # no staging folders left


def test_weights_stay_fp32(ov_export):
    xml = (ov_export[0] / "model.xml").read_text()
    assert 'element_type="f32"' in xml and 'element_type="f16"' not in xml


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_predictor_matches_pytorch_any_batch(ov_export, batch):
    predictor = OpenVinoPredictor(ov_export[0])
    assert predictor.input_shape == [None, 3, 32, 32]
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    expected = torch_probs(tiny_vit(), pixels)
    first = softmax(predictor.logits(pixels))
    again = predictor.logits(pixels[:1])  # a second call must not overwrite the first result
    assert np.abs(first - expected).max() < 1e-5
    assert (first.argmax(-1) == expected.argmax(-1)).all()
    assert np.abs(softmax(again)[0] - expected[0]).max() < 1e-5


def test_same_answers_as_onnx(ov_export, tmp_path):
    onnx_dir = tmp_path / "onnx"
    export_onnx(tiny_vit(), onnx_dir, PREPROCESS)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    ov_rows = OpenVinoPredictor(ov_export[0]).predict_pixels(pixels.numpy(), top_k=3)
    onnx_rows = OnnxPredictor(onnx_dir).predict_pixels(pixels, top_k=3)
    for a, b in zip(ov_rows, onnx_rows, strict=True):
        assert [n for n, _ in a] == [n for n, _ in b] and set(n for n, _ in a) <= set(LABELS)
        assert np.allclose([p for _, p in a], [p for _, p in b], atol=1e-5)
    assert OpenVinoPredictor(ov_export[0]).preprocess == PREPROCESS


def test_user_errors(ov_export, tmp_path):
    predictor = OpenVinoPredictor(ov_export[0])
    with pytest.raises(VitloraError, match="pixel_values must be shaped"):
        predictor.logits(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(VitloraError, match="top_k"):
        predictor.predict_pixels(np.zeros((1, 3, 32, 32), np.float32), top_k=0)
    with pytest.raises(VitloraError, match=r"not a vitlora OpenVINO export: model\.xml is missing"):
        OpenVinoPredictor(tmp_path)
    with pytest.raises(VitloraError, match="already exists"):
        export_openvino(tiny_vit(), ov_export[0], PREPROCESS)


def test_mismatch_discards_export(tmp_path, monkeypatch):
    real_run = OpenVinoPredictor._run
    monkeypatch.setattr(OpenVinoPredictor, "_run", lambda self, x: real_run(self, x) + np.eye(1, 5, 0, np.float32))
    with pytest.raises(VitloraError, match="OpenVINO model does not match PyTorch"):
        export_openvino(tiny_vit(), tmp_path / "out", PREPROCESS)
    assert list(tmp_path.iterdir()) == []


def test_conversion_failure_is_one_line(tmp_path, monkeypatch):
    def broken(onnx_path, xml_path):
        raise VitloraError("OpenVINO conversion failed: RuntimeError: unsupported op")

    monkeypatch.setattr(ov_mod, "_onnx_to_ir", broken)
    with pytest.raises(VitloraError, match="conversion failed"):
        export_openvino(tiny_vit(), tmp_path / "out", PREPROCESS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(not DEIT.is_dir() or not RACCOON.is_dir(), reason="shared DeiT-tiny or raccoon photos missing")
def test_real_deit_openvino(tmp_path):
    from transformers import ViTForImageClassification

    from vitlora.data import Preprocess, expand_image_paths, normalize, stream_decoded

    pp = Preprocess.from_pretrained(str(DEIT))
    paths = expand_image_paths([str(RACCOON)])[:4]
    pixels = torch.cat([normalize(b, pp) for b, names, _ in stream_decoded(paths, pp, 4) if len(names)])
    model = ViTForImageClassification.from_pretrained(DEIT).eval()
    preprocess = json.loads((DEIT / "preprocessor_config.json").read_text())
    report = export_openvino(model, tmp_path / "deit-ov", preprocess, verify_images=pixels)
    print(f"\nDeiT-tiny OpenVINO export: {report}")
    assert report.top1_agree and report.max_abs_prob_diff < 1e-4 and report.n_labels == 1000
    got = softmax(OpenVinoPredictor(report.path).logits(pixels))
    expected = torch_probs(model, pixels)
    assert np.abs(got - expected).max() < 1e-4 and (got.argmax(-1) == expected.argmax(-1)).all()

