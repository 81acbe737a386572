"""Bad input gives one clear line and a non-zero exit, never a traceback or lost work."""

from __future__ import annotations

import json
import os
import re
import shutil
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


# ---- --out is only ever replaced by a complete run, and only when it is a run ----------------------------


@pytest.fixture(scope="module")
def small_run(tiny_model, colour_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "run"
    assert main(["train", str(colour_folder), "--model", str(tiny_model), "--out", str(out), "--epochs", "1",
                 "--quiet", "--precision", "fp32"]) == 0
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad, message", [
    (["DATA=/nonexistent"], "not found"),
    (["--model", "/nonexistent-model"], "nonexistent-model"),
    (["--rank", "0"], "--rank"),
    (["--label-smoothing", "5"], "--label-smoothing"),
])
def test_overwrite_checks_everything_before_touching_out(capsys, tiny_model, colour_folder, small_run, tmp_path,
                                                         bad, message):
    keep = tmp_path / "keep"
    shutil.copytree(small_run, keep)
    before = tree(keep)
    data = bad[0].split("=", 1)[1] if bad[0].startswith("DATA=") else colour_folder
    flags = [] if bad[0].startswith("DATA=") else bad
    code, err = cli(capsys, "train", data, "--model", tiny_model, "--out", keep, "--overwrite", "--quiet", *flags)
    assert code == 2 and message in one_line_error(err)
    assert tree(keep) == before and sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_overwrite_refuses_a_folder_that_is_not_a_run(capsys, tiny_model, colour_folder, tmp_path):
    precious = tmp_path / "precious"
    (precious / "docs").mkdir(parents=True)
    (precious / "docs" / "a.txt").write_text("mine")
    code, err = cli(capsys, "train", colour_folder, "--model", tiny_model, "--out", precious, "--overwrite", "--quiet")
    assert code == 2 and "is not a vitlora run" in one_line_error(err)
    assert (precious / "docs" / "a.txt").read_text() == "mine"


def test_symlinked_out_is_refused_and_its_target_untouched(capsys, tiny_model, colour_folder, small_run, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(small_run, target)
    before = tree(target)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    code, err = cli(capsys, "train", colour_folder, "--model", tiny_model, "--out", link, "--overwrite", "--quiet")
    assert code == 2 and "symbolic link" in one_line_error(err)
    assert tree(target) == before and link.is_symlink()


def test_overwrite_removes_a_link_inside_the_run_without_following_it(capsys, tiny_model, colour_folder, small_run,
                                                                      tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the run's")
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    (out / "linked").symlink_to(elsewhere, target_is_directory=True)
    code, err = cli(capsys, "train", colour_folder, "--model", tiny_model, "--out", out, "--overwrite", "--quiet",
                    "--epochs", "1")
    assert code == 0, err
    assert not (out / "linked").exists() and (elsewhere / "keep.txt").read_text() == "not the run's"
    assert "saved run" in err and re.search(r"val accuracy \d\.\d{4},", err)  # 4 decimals, not a raw float


def test_paths_under_a_file_are_one_line_errors(capsys, tiny_model, colour_folder, small_run, tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    code, err = cli(capsys, "train", colour_folder, "--model", tiny_model, "--out", afile / "sub", "--quiet")
    assert code == 2 and "is a file" in one_line_error(err)
    for flag in ("--json", "--csv"):
        code, err = cli(capsys, "predict", small_run, colour_folder / "red", flag, afile / "sub.out")
        assert code == 2 and "file.txt" in one_line_error(err), flag
    code, err = cli(capsys, "merge", small_run, afile / "merged")
    assert code == 2 and "file.txt" in one_line_error(err)
    assert afile.read_text() == "x"


def test_predict_csv_and_json_with_non_utf8_file_names(capsys, small_run, colour_folder, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    raw = os.fsencode(photos) + b"/caf\xe9.jpg"  # a Latin-1 name: not valid UTF-8
    with open(raw, "wb") as fh:
        fh.write(next((colour_folder / "red").glob("*.jpg")).read_bytes())
    capsys.readouterr()
    assert main(["predict", str(small_run), str(photos), "--csv", str(tmp_path / "p.csv")]) == 0
    assert "caf\ufffd.jpg" in capsys.readouterr().out  # shown readably on the terminal
    body = (tmp_path / "p.csv").read_bytes()
    assert raw in body  # the exact bytes of the name: the row points at the file
    assert main(["predict", str(small_run), str(photos), "--json", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert os.fsencode(rows[0]["path"]) == raw


def test_inference_auto_precision_is_fp32_even_where_training_would_pick_bf16(capsys, monkeypatch, small_run,
                                                                              colour_folder, tmp_path):
    import torch

    from vitlora import runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)  # as on an AVX-512-BF16 / AMX CPU
    assert runtime.pick_precision("auto", torch.device("cpu"))[0] == "bf16"  # training's auto does switch
    for precision, name in (("auto", "auto.json"), ("fp32", "fp32.json")):
        assert main(["predict", str(small_run), str(colour_folder / "green"), "--precision", precision,
                     "--json", str(tmp_path / name)]) == 0
    auto, fp32 = (json.loads((tmp_path / n).read_text()) for n in ("auto.json", "fp32.json"))
    assert [r["path"] for r in auto] == [r["path"] for r in fp32]
    for a, b in zip(auto, fp32):
        assert [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]]
        assert all(abs(x["score"] - y["score"]) <= 1e-5 for x, y in zip(a["top_k"], b["top_k"]))
    from vitlora.run import load

    assert load(small_run, precision="auto").precision == "fp32"


def test_run_files_record_no_absolute_paths_given_relative_ones(capsys, monkeypatch, tiny_model, colour_folder,
                                                               tmp_path):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, "base")
    shutil.copytree(colour_folder, "photos")
    assert main(["train", "photos", "--model", "base", "--out", "runs/r", "--epochs", "1", "--quiet"]) == 0
    for name in ("vitlora.json", "metrics.json", "README.md", "adapter_config.json", "labels.json"):
        assert str(tmp_path) not in (tmp_path / "runs" / "r" / name).read_text(), name
    meta = json.loads((tmp_path / "runs" / "r" / "vitlora.json").read_text())
    assert (meta["base_model"], meta["config"]["data"], meta["config"]["out"]) == ("base", "photos", "runs/r")
