"""`vitlora export --int8 / --format openvino` and `predict --onnx [--int8]` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitlora.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tiny_model, colour_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-export") / "colours"
    assert run_cli("train", colour_folder, "--model", tiny_model, "--out", out, "--epochs", "1", "--quiet",
                   "--val-split", "0.25") == 0
    return out


def top1(path: Path) -> list[str]:
    return [row["top_k"][0]["label"] for row in json.loads(path.read_text())]


def test_export_int8_then_predict_with_it(run_dir, colour_folder, tmp_path, capsys):
    out, fp32_json, int8_json = tmp_path / "int8", tmp_path / "a.json", tmp_path / "b.json"
    assert run_cli("export", run_dir, out, "--int8") == 0
    assert "int8 model" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "model.int8.onnx", "preprocessor_config.json"]
    assert run_cli("predict", run_dir, colour_folder, "--precision", "fp32", "--json", fp32_json) == 0
    assert run_cli("predict", run_dir, colour_folder, "--onnx", out, "--int8", "--json", int8_json) == 0
    a, b = top1(fp32_json), top1(int8_json)
    assert len(a) == 48 and sum(x == y for x, y in zip(a, b)) >= 0.95 * len(a)


def test_predict_int8_exports_once_into_the_named_folder(run_dir, colour_folder, tmp_path, capsys):
    out, rows = tmp_path / "cache", tmp_path / "rows.json"
    assert run_cli("predict", run_dir, colour_folder / "red", "--onnx", out, "--int8", "--json", rows) == 0
    assert "int8 model" in capsys.readouterr().err and (out / "model.int8.onnx").is_file()
    stamp = (out / "model.int8.onnx").stat().st_mtime_ns
    assert run_cli("predict", run_dir, colour_folder / "red", "--onnx", out, "--int8", "--json", rows) == 0
    assert (out / "model.int8.onnx").stat().st_mtime_ns == stamp  # reused, not re-exported
    assert len(top1(rows)) == 16


def test_int8_user_errors(run_dir, colour_folder, tmp_path, capsys):
    assert run_cli("predict", run_dir, colour_folder / "red", "--int8") == 2
    assert "--int8 needs --onnx" in capsys.readouterr().err
    fp32 = tmp_path / "fp32"
    assert run_cli("export", run_dir, fp32) == 0
    assert run_cli("predict", run_dir, colour_folder / "red", "--onnx", fp32, "--int8") == 2
    assert "no int8 model" in capsys.readouterr().err
    assert run_cli("export", run_dir, tmp_path / "ov", "--format", "openvino", "--int8") == 2
    assert "only offered for the onnx format" in capsys.readouterr().err


def test_export_openvino_then_predict_with_it(run_dir, colour_folder, tmp_path):
    pytest.importorskip("openvino")
    out, a, b = tmp_path / "ov", tmp_path / "a.json", tmp_path / "b.json"
    assert run_cli("export", run_dir, out, "--format", "openvino", "--verify-images", colour_folder / "blue") == 0
    assert (out / "model.xml").is_file() and (out / "model.bin").is_file()
    assert run_cli("predict", run_dir, colour_folder / "blue", "--precision", "fp32", "--json", a) == 0
    assert run_cli("predict", run_dir, colour_folder / "blue", "--onnx", out, "--json", b) == 0
    torch_rows, ov_rows = json.loads(a.read_text()), json.loads(b.read_text())
    for t, o in zip(torch_rows, ov_rows, strict=True):
        assert t["path"] == o["path"] and t["top_k"][0]["label"] == o["top_k"][0]["label"]
        assert abs(t["top_k"][0]["score"] - o["top_k"][0]["score"]) < 1e-4
