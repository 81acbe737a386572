"""Scale-out: the same `vitlora train` command under `torchrun --nproc_per_node=2` (DDP, gloo on CPU).

One 2-process run through the CLI entry point (`python -m torch.distributed.run --standalone
--nproc_per_node=2 PROBE train ...`, where PROBE calls `vitlora.cli.main` exactly as
`-m vitlora.cli` does) is compared with a single-process run of the same command:

* the run directory is valid (every file, `world_size` 2 recorded, loads, predicts);
* both reach the same quality on the synthetic colour classes;
* DDP really averages gradients: after every epoch the trainable parameters are bit-identical
  on both ranks (the probe all-gathers a checksum at each end-of-epoch barrier), which
  fails if a rank trained on its own shard alone or the no-sync/accumulation path is wrong.

Gradient accumulation (`--grad-accum 2`) and CPU micro-batches (a tiny activation budget
splits each rank's 8 images into 2 micro-batches of 4) are on in both runs, so DDP's
`no_sync` path is exercised at both levels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MICRO = {"VITLORA_ACTIVATION_MB": "0.3"}  # tiny ViT: ~0.1 MB/image -> micro-batches of 4
ARGS = ["--epochs", "3", "--batch-size", "16", "--grad-accum", "2", "--lr", "5e-3", "--rank", "4", "--alpha", "8",
        "--val-split", "0.25", "--quiet", "--device", "cpu"]

# Runs on every rank: records, at every end-of-epoch barrier, a checksum of this rank's
# trainable parameters gathered from all ranks, then runs the CLI like `-m vitlora.cli`.
PROBE = r'''
import json, os, sys
import torch
import vitlora.loop as L
from vitlora.cli import main

wrapped = []

class DDP(torch.nn.parallel.DistributedDataParallel):  # records the model the loop trains
    def __init__(self, module, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        wrapped.append(module)

real_barrier = L.barrier

def barrier(rt):
    if rt.distributed and wrapped:
        with torch.no_grad():
            flat = torch.cat([p.detach().double().flatten() for p in wrapped[-1].parameters() if p.requires_grad])
        mine = torch.stack([flat.sum(), (flat * torch.arange(1, len(flat) + 1, dtype=flat.dtype)).sum()])
        every = [torch.zeros_like(mine) for _ in range(rt.world_size)]
        torch.distributed.all_gather(every, mine)
        if rt.is_main:
            with open(os.environ["PROBE_OUT"], "a") as f:
                f.write(json.dumps([e.tolist() for e in every]) + "\n")
    real_barrier(rt)

torch.nn.parallel.DistributedDataParallel = DDP
L.barrier = barrier
sys.exit(main(sys.argv[1:]))
'''


def _env(**extra: str) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_torchrun_two_processes_match_one(tiny_model, colour_folder, tmp_path: Path, monkeypatch):
    import torch

    import vitlora
    from vitlora.cli import main
    from vitlora.data import discover

    probe, checks = tmp_path / "probe.py", tmp_path / "checks.jsonl"
    probe.write_text(PROBE)
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe),
           "train", str(colour_folder), "--model", str(tiny_model), "--out", str(ddp_out), *ARGS]
    proc = subprocess.Popen(cmd, env=_env(PROBE_OUT=str(checks), **MICRO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    threads = torch.get_num_threads()
    monkeypatch.setenv("VITLORA_ACTIVATION_MB", MICRO["VITLORA_ACTIVATION_MB"])
    try:  # the single-process run, in this process, while the 2-process one runs
        assert main(["train", str(colour_folder), "--model", str(tiny_model), "--out", str(single_out), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
        try:
            log, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
    assert proc.returncode == 0, log[-4000:]
    assert "2 processes" in log
    assert "runs as 2 micro-batches of <= 4" in log

    # a complete run directory, which records the world size
    for name in ("adapter_config.json", "adapter_model.safetensors", "labels.json", "preprocessor_config.json",
                 "vitlora.json", "metrics.json", "README.md", "training_curves.png"):
        assert (ddp_out / name).is_file(), name
    meta = json.loads((ddp_out / "vitlora.json").read_text())
    single_meta = json.loads((single_out / "vitlora.json").read_text())
    assert meta["world_size"] == 2 and single_meta["world_size"] == 1
    assert meta["data"]["n_train"] == single_meta["data"]["n_train"] == 36

    # gradients were averaged: identical trainable parameters on both ranks after every epoch
    rows = [json.loads(line) for line in checks.read_text().splitlines()]
    assert len(rows) >= 3
    for rank0, rank1 in rows:
        assert rank0 == rank1

    # same quality as one process
    metrics = json.loads((ddp_out / "metrics.json").read_text())
    single = json.loads((single_out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert metrics["best_val_accuracy"] >= 0.9 and single["best_val_accuracy"] >= 0.9
    assert abs(metrics["best_val_accuracy"] - single["best_val_accuracy"]) <= 0.1
    last, last_single = metrics["epochs"][-1]["train_loss"], single["epochs"][-1]["train_loss"]
    assert last < metrics["epochs"][0]["train_loss"]
    assert last == pytest.approx(last_single, rel=0.35)

    # the run loads and predicts like a single-process one
    samples = discover(str(colour_folder)).samples
    preds = vitlora.load(ddp_out).predict([s.path for s in samples], top_k=1)
    accuracy = sum(p.top_k[0][0] == s.label for p, s in zip(preds, samples)) / len(samples)
    single_preds = vitlora.load(single_out).predict([s.path for s in samples], top_k=1)
    single_accuracy = sum(p.top_k[0][0] == s.label for p, s in zip(single_preds, samples)) / len(samples)
    assert accuracy >= 0.9 and abs(accuracy - single_accuracy) <= 0.1
