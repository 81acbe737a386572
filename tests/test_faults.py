"""Fault injection: kill -9 at several points of training, a full disk, concurrent trainers.

Every case asserts the outcome the README's error contract promises: `--out` holds the old run
byte for byte, or the complete new run, never half of one; `--resume` continues after a kill;
a refused or failed command is one line on stderr with exit code 2. Kills are deterministic:
a small driver (below) runs `train_to_dir` in a child process and SIGKILLs itself at a named
point (an epoch's end, after the calibrated adapter is written, between the two renames of the
final swap). No timing is asserted; waits have generous bounds only to never hang.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_errors import cli, one_line_error

from vitlora.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "8", "--rank", "4", "--alpha", "8", "--precision", "fp32", "--val-split", "0.25", "--quiet"]

DRIVER = r'''
import json, os, signal, sys, time
from pathlib import Path

from vitlora import persist, rundir
from vitlora.config import TrainConfig
from vitlora.training import train_to_dir

config, point, gate = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def on_epoch_end(record):
    if point == f"epoch-{record['epoch']}":
        Path(gate + ".ready").touch()  # the test may act while this trainer holds the lock
        for _ in range(1200):
            if Path(gate).exists():
                break
            time.sleep(0.1)
        die()


if point == "calibrated":  # the calibrated adapter is written, vitlora.json does not say so yet
    save = persist.RunWriter.save_adapter

    def save_adapter(self, model, folder=None):
        save(self, model, folder)
        if "extend" in self.meta:
            die()

    persist.RunWriter.save_adapter = save_adapter
elif point == "swap":  # the old run moved aside, the new one not yet renamed in
    replace = os.replace

    def killing_replace(src, dst):
        replace(src, dst)
        if str(dst).endswith(".old"):
            die()

    rundir.os.replace = killing_replace
train_to_dir(TrainConfig.from_dict(config), overwrite=True, progress=False, on_epoch_end=on_epoch_end)
'''


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Same arithmetic in this process and in the killed child (resume is compared to a clean run)."""
    monkeypatch.setenv("VITLORA_THREADS", "1")


@pytest.fixture(scope="module")
def base_run(tiny_model, colour_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    assert train(colour_folder, tiny_model, out, "--epochs", "1") == 0
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train(data: Path, model: Path, out: Path, *extra) -> int:
    return main([str(a) for a in ("train", data, "--model", model, "--out", out, *FAST, *extra)])


def start_killed(tmp_path: Path, config: dict, point: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    gate = tmp_path / f"gate-{point}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(config), point, str(gate)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, gate


def config_for(data: Path, model: Path, out: Path, **more) -> dict:
    return {"data": str(data), "model": str(model), "out": str(out), "batch_size": 8, "rank": 4, "alpha": 8,
            "precision": "fp32", "val_split": 0.25, **more}


def wait_killed(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]


def test_kill_mid_run_keeps_old_run_refuses_second_trainer_and_resumes(capsys, tiny_model, colour_folder, base_run,
                                                                        tmp_path):
    from vitlora.run import load

    out = tmp_path / "keep"
    shutil.copytree(base_run, out)
    old = snapshot(out)
    proc, gate = start_killed(tmp_path, config_for(colour_folder, tiny_model, out, epochs=3), "epoch-1")
    try:
        for _ in range(3000):  # until the child has finished epoch 1 and holds the lock
            if Path(str(gate) + ".ready").exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        code, err = cli(capsys, "train", colour_folder, "--model", tiny_model, "--out", out, "--overwrite",
                        *FAST, "--epochs", "1")
        assert code == 2 and "another vitlora process is writing" in one_line_error(err)
    finally:
        gate.touch()
    wait_killed(proc)

    assert snapshot(out) == old  # killed mid-run: the old run, byte for byte
    load(out)
    staging = tmp_path / ".keep.staging"
    assert (staging / "checkpoints" / "last" / "state.pt").is_file()
    # a new run without --resume would silently drop the interrupted one: refused
    code, err = cli(capsys, "train", colour_folder, "--model", tiny_model, "--out", out, *FAST, "--epochs", "1")
    assert code == 2 and "--resume" in one_line_error(err)

    # the kernel freed the killed trainer's lock; --resume continues where it stopped
    assert main(["train", str(colour_folder), "--out", str(out), "--resume", "--epochs", "3", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert not staging.exists() and not (tmp_path / ".keep.lock").exists()
    assert sorted(load(out).labels) == ["blue", "green", "red"]


def test_kill_after_calibration_then_resume_keeps_the_calibrated_shift(tiny_model, red_folder, tmp_path):
    common = ["--label", "raccoon", "--epochs", "2"]
    ref = tmp_path / "ref"
    assert train(red_folder, tiny_model, ref, *common) == 0
    expected = json.loads((ref / "vitlora.json").read_text())["extend"]["calibration"]["raccoon"]
    assert abs(expected["bias_shift"]) > 1e-3  # calibrating an already calibrated head would give ~0

    out = tmp_path / "cut"
    proc, _ = start_killed(tmp_path, config_for(red_folder, tiny_model, out, label="raccoon", epochs=2),
                           "calibrated")
    wait_killed(proc)
    assert not out.exists()  # killed during the final save: no run, not a half one
    assert main(["train", str(red_folder), "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    got = json.loads((out / "vitlora.json").read_text())["extend"]["calibration"]["raccoon"]
    assert got["bias_shift"] == pytest.approx(expected["bias_shift"], abs=1e-4)
    assert got["bias"] == pytest.approx(expected["bias"], abs=1e-4)

    # --resume of the finished run: nothing to train, nothing recalibrated, nothing rewritten
    before = snapshot(out)
    assert main(["train", str(red_folder), "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert snapshot(out) == before


def test_kill_between_the_swap_renames_then_old_run_comes_back_or_new_one_is_finished(tiny_model, colour_folder,
                                                                                    base_run, tmp_path):
    out = tmp_path / "swap"
    shutil.copytree(base_run, out)
    old = snapshot(out)
    proc, _ = start_killed(tmp_path, config_for(colour_folder, tiny_model, out, epochs=2), "swap")
    wait_killed(proc)
    assert not out.exists() and snapshot(tmp_path / ".swap.old") == old  # no half run: the old one aside, whole
    assert main(["train", str(colour_folder), "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert not (tmp_path / ".swap.old").exists() and not (tmp_path / ".swap.staging").exists()


# ---- a full disk -------------------------------------------------------------------------


def fail_fsync_after(monkeypatch, n: int) -> None:
    """Every atomic write ends in fsync: the (n+1)-th one fails as on a full disk."""
    import vitlora.rundir

    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(vitlora.rundir.os, "fsync", fsync)


@pytest.mark.parametrize("fail_after, resumable", [(0, False), (5, True)])
def test_disk_full_during_training_keeps_old_run(capsys, monkeypatch, tiny_model, colour_folder, base_run, tmp_path,
                                                 fail_after, resumable):
    out = tmp_path / "keep"
    shutil.copytree(base_run, out)
    old = snapshot(out)
    fail_fsync_after(monkeypatch, fail_after)  # 0: the first save; 5: after epoch 1's checkpoint
    code, err = cli(capsys, "train", colour_folder, "--model", tiny_model, "--out", out, "--overwrite", *FAST,
                    "--epochs", "2")
    line = one_line_error(err)
    assert code == 2 and "No space left on device" in line and "is unchanged" in line
    assert snapshot(out) == old
    staging = tmp_path / ".keep.staging"
    assert staging.exists() == resumable and ("--resume" in line) == resumable
    monkeypatch.undo()
    if resumable:
        assert main(["train", str(colour_folder), "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
        assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 2


def test_disk_full_in_merge_and_predict_leaves_nothing_half_written(capsys, monkeypatch, base_run, colour_folder,
                                                                   tmp_path):
    fail_fsync_after(monkeypatch, 0)
    for args, target in ((["predict", base_run, colour_folder / "red", "--json", tmp_path / "p.json"], "p.json"),
                         (["predict", base_run, colour_folder / "red", "--csv", tmp_path / "p.csv"], "p.csv"),
                         (["merge", base_run, tmp_path / "merged"], "merged")):
        code, err = cli(capsys, *args)
        assert code == 2 and "No space left on device" in one_line_error(err), args
        assert sorted(p.name for p in tmp_path.iterdir()) == [], target  # no output, no temporary left


def mount_small_tmpfs(where: Path, size: str = "2m") -> bool:
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def test_real_full_disk_on_a_small_tmpfs(capsys, tiny_model, colour_folder, base_run, tmp_path):
    disk = tmp_path / "disk"
    if not mount_small_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        out = disk / "run"
        shutil.copytree(base_run, out)
        old = snapshot(out)
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk to the last block
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        code, err = cli(capsys, "train", colour_folder, "--model", tiny_model, "--out", out, "--overwrite", *FAST,
                        "--epochs", "1")
        assert code == 2 and "No space left on device" in one_line_error(err)
        code, err = cli(capsys, "predict", base_run, colour_folder / "red", "--csv", disk / "p.csv")
        assert code == 2 and "No space left on device" in one_line_error(err)
        code, err = cli(capsys, "merge", base_run, disk / "merged")
        assert code == 2 and "No space left on device" in one_line_error(err)
        assert snapshot(out) == old
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "run"]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)


def test_training_a_finished_run_longer_keeps_it_until_the_longer_one_is_complete(capsys, monkeypatch, base_run,
                                                                                 colour_folder, tmp_path):
    out = tmp_path / "longer"
    shutil.copytree(base_run, out)
    old = snapshot(out)
    fail_fsync_after(monkeypatch, 0)  # the copy to staging works, the first save in it fails
    code, err = cli(capsys, "train", colour_folder, "--out", out, "--resume", "--epochs", "2", "--quiet")
    assert code == 2 and "No space left on device" in one_line_error(err)
    assert snapshot(out) == old
    monkeypatch.undo()
    assert main(["train", str(colour_folder), "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["longer"]
