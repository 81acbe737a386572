"""Bad input gives one clear line and a non-zero exit, never a traceback or lost work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vitlora.cli import main


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "expected an error message"
    assert "Traceback" not in err
    return lines[-1]


def test_offline_hub_id_is_one_sentence_exit_2(capsys, colour_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    code, err = cli(capsys, "train", colour_folder, "--model", "facebook/deit-tiny-patch16-224",
                    "--out", tmp_path / "o", "--quiet")
    assert code == 2
    line = one_line_error(err)
    assert "hub is unreachable" in line and "--model PATH" in line


def test_empty_data_and_missing_class_images(capsys, tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = cli(capsys, "train", empty, "--model", tiny_model, "--out", tmp_path / "o")
    assert code == 2 and "no images" in one_line_error(err)
    code, err = cli(capsys, "train", tmp_path / "missing", "--model", tiny_model, "--out", tmp_path / "o")
    assert code == 2 and "not found" in one_line_error(err)


def test_one_class_in_replace_mode(capsys, tiny_model, colour_folder, tmp_path):
    only = tmp_path / "only"
    (only / "red").mkdir(parents=True)
    for p in list((colour_folder / "red").iterdir())[:4]:
        (only / "red" / p.name).write_bytes(p.read_bytes())
    code, err = cli(capsys, "train", only, "--model", tiny_model, "--mode", "replace", "--out", tmp_path / "o")
    assert code == 2 and "at least 2 classes" in one_line_error(err)


def test_label_with_imagefolder(capsys, tiny_model, colour_folder, tmp_path):
    code, err = cli(capsys, "train", colour_folder, "--label", "x", "--model", tiny_model, "--out", tmp_path / "o")
    assert code == 2 and "--label" in one_line_error(err)


def test_existing_out_is_not_overwritten(capsys, tiny_model, colour_folder, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = cli(capsys, "train", colour_folder, "--model", tiny_model, "--out", out)
    assert code == 2 and "--overwrite" in one_line_error(err)
    assert (out / "precious.txt").read_text() == "keep me"


def test_not_a_run_dir(capsys, tmp_path, colour_folder):
    for command in (["info", tmp_path], ["predict", tmp_path, colour_folder], ["eval", tmp_path, colour_folder],
                    ["merge", tmp_path, tmp_path / "m"]):
        code, err = cli(capsys, *command)
        assert code == 2 and "is not a vitlora run" in one_line_error(err), command


def test_bad_flag_values(capsys, tiny_model, colour_folder, tmp_path):
    code, err = cli(capsys, "train", colour_folder, "--model", tiny_model, "--targets", "query,banana",
                    "--out", tmp_path / "o")
    assert code == 2 and "banana" in one_line_error(err)
    code, err = cli(capsys, "train", colour_folder, "--model", tiny_model, "--rank", "0", "--out", tmp_path / "o")
    assert code == 2 and "--rank" in one_line_error(err)
    with pytest.raises(SystemExit) as exc:
        main(["train", str(colour_folder), "--mode", "sideways"])
    assert exc.value.code == 2


def test_bad_images_are_skipped_and_counted(capsys, tiny_model, colour_folder, tmp_path):
    data = tmp_path / "data"
    for cls in ("red", "green"):
        (data / cls).mkdir(parents=True)
        for p in list((colour_folder / cls).iterdir())[:6]:
            (data / cls / p.name).write_bytes(p.read_bytes())
    (data / "red" / "notes.jpg").write_text("this is not an image")
    good = next((colour_folder / "green").glob("*.jpg")).read_bytes()
    (data / "green" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    code, err = cli(capsys, "train", data, "--model", tiny_model, "--out", tmp_path / "o", "--epochs", "1",
                    "--quiet", "--val-split", "0.2")
    assert code == 0
    assert "skipped 2" in err and "notes.jpg" in err
    code, err = cli(capsys, "train", data, "--model", tiny_model, "--out", tmp_path / "o2", "--epochs", "1",
                    "--quiet", "--strict")
    assert code == 2 and "notes.jpg" in one_line_error(err)


def test_eval_unknown_labels_named(capsys, tiny_model, colour_folder, tmp_path):
    run = tmp_path / "run"
    two = tmp_path / "two"
    for cls in ("red", "green"):
        (two / cls).mkdir(parents=True)
        for p in list((colour_folder / cls).iterdir())[:6]:
            (two / cls / p.name).write_bytes(p.read_bytes())
    assert main(["train", str(two), "--model", str(tiny_model), "--out", str(run), "--epochs", "1", "--quiet"]) == 0
    code, err = cli(capsys, "eval", run, colour_folder)
    assert code == 2 and "does not know: blue" in one_line_error(err)


def test_wrong_base_model_for_adapter(capsys, tiny_model, colour_folder, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    run = tmp_path / "run"
    assert main(["train", str(colour_folder), "--model", str(tiny_model), "--out", str(run), "--epochs", "1",
                 "--quiet"]) == 0
    other = tmp_path / "other-base"
    ViTForImageClassification(ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, image_size=32, patch_size=8,
                                        num_labels=3)).save_pretrained(other)
    (other / "preprocessor_config.json").write_text((Path(tiny_model) / "preprocessor_config.json").read_text())
    meta = json.loads((run / "vitlora.json").read_text())
    meta["base_model"] = str(other)
    (run / "vitlora.json").write_text(json.dumps(meta))
    code, err = cli(capsys, "predict", run, colour_folder / "red")
    assert code == 2 and "does not match" in one_line_error(err)


def test_console_script_help_is_fast_and_clean():
    out = subprocess.run([sys.executable, "-m", "vitlora.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "train" in out.stdout and "predict" in out.stdout
