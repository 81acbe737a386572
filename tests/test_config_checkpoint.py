"""Settings are typed and checked before anything runs; checkpoints load without running code; outputs never clobber a run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_cli_errors import cli, one_line_error

from vitlora.config import TrainConfig, read_config_file
from vitlora.errors import VitloraError


@pytest.mark.parametrize("setting, message", [
    ('rank = "four"', "rank must be a whole number"),
    ("targets = 5", "targets must be a list"),
    ("rank = 4.7", "rank must be a whole number"),
    ('strict = "no"', "strict must be true or false"),
    ("batch_size = true", "batch_size must be a whole number"),
])
def test_config_file_of_wrong_type_is_one_line_error(capsys, colour_folder, tmp_path, setting, message):
    cfg = tmp_path / "settings.toml"
    cfg.write_text(setting + "\n")
    code, err = cli(capsys, "train", colour_folder, "--config", cfg, "--out", tmp_path / "o", "--quiet")
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_int_for_float_setting_is_fine_and_becomes_float():
    config = TrainConfig.from_dict({"data": "d", "lr": 1, "alpha": 16})
    assert isinstance(config.lr, float) and config.lr == 1.0 and isinstance(config.alpha, float)


@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--label-smoothing", "-1"], "--label-smoothing must be in [0, 1)"),
    (["--label-smoothing", "5"], "--label-smoothing must be in [0, 1)"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(capsys, colour_folder, tmp_path, flags, message):
    code, err = cli(capsys, "train", colour_folder, *flags, "--out", tmp_path / "o", "--quiet")
    assert code == 2 and message in one_line_error(err)


def test_predict_batch_size_zero_is_one_line_error(capsys, tmp_path):
    code, err = cli(capsys, "predict", tmp_path, tmp_path, "--batch-size", "0")
    assert code == 2 and "--batch-size" in one_line_error(err)


def test_old_vitlora_json_without_new_fields_loads_with_defaults(tmp_path):
    old = {"config": {"data": "photos", "rank": 4, "targets": ["query", "value"], "distill": 1.0}}
    (tmp_path / "vitlora.json").write_text(json.dumps(old))
    config = TrainConfig.from_dict(read_config_file(str(tmp_path / "vitlora.json")))
    assert config.rank == 4
    assert (config.lp_steps, config.lp_lr, config.temperature) == (100, 0.05, 1.0)
    assert set(config.to_dict()) >= {"lp_steps", "lp_lr", "temperature", "activation_mb"}  # recorded from now on


def test_activation_budget_env_var_overrides_the_field(monkeypatch):
    assert TrainConfig(data="d").activation_mb == 384.0
    monkeypatch.setenv("VITLORA_ACTIVATION_MB", "12.5")
    assert TrainConfig(data="d", activation_mb=99).activation_mb == 12.5
    monkeypatch.setenv("VITLORA_ACTIVATION_MB", "lots")
    with pytest.raises(VitloraError, match="VITLORA_ACTIVATION_MB must be a number"):
        TrainConfig(data="d")


def test_train_help_comes_from_the_config_fields(capsys):
    with pytest.raises(SystemExit):
        cli(capsys, "train", "--help")
    out = " ".join(capsys.readouterr().out.split())
    for f in ("--lp-steps", "--temperature", "--activation-mb", "--label-smoothing"):
        assert f in out
    assert "LoRA rank r (default 8)" in out and "(default query,value)" in out


class _Touch:
    """Unpickling this runs `touch PATH` (what a crafted checkpoint in a downloaded run folder could do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_crafted_checkpoint_runs_nothing_on_resume(capsys, colour_folder, tmp_path):
    marker, out = tmp_path / "pwned", tmp_path / "run"
    state = out / "checkpoints" / "last" / "state.pt"
    state.parent.mkdir(parents=True)
    torch.save({"config": {"data": str(colour_folder)}, "trainable": {}, "state": {}, "x": _Touch(marker)}, state)
    code, err = cli(capsys, "train", colour_folder, "--out", out, "--resume", "--quiet")
    assert code == 2 and "cannot load" in one_line_error(err) and "state.pt" in one_line_error(err)
    assert not marker.exists()
    torch.load(state, weights_only=False)  # the file is live: an unsafe load would have run it
    assert marker.exists()


def test_merge_refuses_the_run_itself_inside_it_or_its_parent(tmp_path):
    from vitlora.rundir import check_destination

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "vitlora.json").write_text("{}")
    for dest in (run, run / "merged", tmp_path / "runs"):
        with pytest.raises(VitloraError, match="is the run .* inside it or contains it"):
            check_destination(dest, run, overwrite=True, kind_file="config.json")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep")
    with pytest.raises(VitloraError, match="holds no config.json"):
        check_destination(notes, run, overwrite=True, kind_file="config.json")
    assert check_destination(tmp_path / "fresh", run, overwrite=False) == (tmp_path / "fresh").resolve()


def test_merge_and_export_into_the_run_are_refused_and_the_run_survives(capsys, tiny_model, colour_folder, tmp_path):
    run = tmp_path / "runs" / "a"
    assert cli(capsys, "train", colour_folder, "--model", tiny_model, "--out", run, "--epochs", "1",
               "--batch-size", "8", "--quiet")[0] == 0
    before = sorted(p.name for p in run.iterdir())
    for command in ("merge", "export"):
        for dest in (run, tmp_path / "runs"):
            code, err = cli(capsys, command, run, dest, "--overwrite")
            assert code == 2 and "inside it or contains it" in one_line_error(err), (command, dest)
    assert sorted(p.name for p in run.iterdir()) == before
