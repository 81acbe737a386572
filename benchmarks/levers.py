#!/usr/bin/env python
"""Measure vitlora's CPU speed levers one at a time, side by side in one process.

``step`` (default): vitlora's own training step (``vitlora.loop.Loop.step`` on the model
``vitlora.training.build_model`` builds: DeiT-tiny, extend head, LoRA on query/value, the real
augmentation from a uint8 cache), for variants ``THREADS:DROPOUT:BATCH[/MICRO]``:

* ``DROPOUT``: ``peft`` (PEFT's ``nn.Dropout``), ``fast`` (``vitlora.lora.FastDropout``, what
  ``vitlora train`` uses) or ``none`` (no dropout: the floor);
* ``BATCH/MICRO``: optimizer batch and micro-batch (gradient accumulation inside the batch).

Variants run round-robin (``--rounds`` rounds after one warm-up round) so background load hits
them alike; each line shows the median of the rounds as wall-clock images/s and as images per
CPU-second of this process. On a machine others are using, the CPU-second figure is the
steadier measure of the work a variant needs (it is not comparable across thread counts:
OpenMP threads spin while they wait).

``memory``: peak RSS added by training steps, one fresh subprocess per ``BATCH[/MICRO]``.

Examples::

    python benchmarks/levers.py --variants 1:peft:32,1:fast:32,1:none:32
    python benchmarks/levers.py --variants 1:fast:32,2:fast:32
    python benchmarks/levers.py --variants 1:fast:32,1:fast:32/16,1:fast:32/8
    python benchmarks/levers.py --what memory --variants 32,32/8,16,8
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

MODEL = "/work/shared/models/deit-tiny-patch16-224"


class RandomCache:
    """Random uint8 "photos" of the new class (index 1000), shaped like vitlora's decoded training cache."""

    def __init__(self, n: int) -> None:
        import torch

        self.images = torch.randint(0, 256, (n, 3, 256, 256), dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx):
        import torch

        return self.images[idx], torch.full((len(idx),), 1000)


def build(model_path: str, rank: int, dropout: float, cache: RandomCache):
    """vitlora's model phase and training loop set-up, as `vitlora train DATA --label raccoon` runs them."""
    import torch

    from vitlora.config import TrainConfig
    from vitlora.loop import Job, Loop
    from vitlora.runtime import Runtime
    from vitlora.training import build_model

    config = TrainConfig(data="-", model=model_path, label="raccoon", rank=rank, alpha=2 * rank, dropout=dropout,
                         lr=1e-4, lp_steps=0)
    built = build_model(config, ["raccoon"])
    built.peft_model.train()
    job = Job(built.peft_model, cache, None, built.pp, dict(enumerate(built.change.labels)))
    return built.peft_model, Loop(job, config, Runtime(torch.device("cpu"), "fp32", ""), lora_scale=1.0)


def parse_batch(text: str) -> tuple[int, int]:
    batch, _, micro = text.partition("/")
    return int(batch), int(micro or batch)


def train_steps(loop, gen, batch: int, micro: int, images: int) -> None:
    import torch

    loop.micro = micro
    for i in range(max(1, images // batch)):
        loop.step(torch.randint(0, len(loop.job.train_cache), (batch,), generator=gen), 1, i, last=True)


def step(a: argparse.Namespace) -> None:
    import torch

    from vitlora.lora import FastDropout

    peft_model, loop = build(a.model, a.rank, a.dropout, RandomCache(128))
    drops = [m.lora_dropout for m in peft_model.modules() if isinstance(getattr(m, "lora_dropout", None),
                                                                            torch.nn.ModuleDict)]

    def set_dropout(kind: str) -> None:
        for d in drops:
            for name in list(d.keys()):
                d[name] = {"peft": lambda: torch.nn.Dropout(a.dropout), "fast": lambda: FastDropout(a.dropout),
                           "none": torch.nn.Identity}[kind]()
        peft_model.train()

    gen = torch.Generator().manual_seed(0)
    variants = [v.split(":") for v in a.variants.split(",")]
    wall: dict[str, list[float]] = {":".join(v): [] for v in variants}
    cpu: dict[str, list[float]] = {":".join(v): [] for v in variants}
    for r in range(a.rounds + 1):
        for threads, kind, batch_spec in variants:
            torch.set_num_threads(int(threads))
            set_dropout(kind)
            batch, micro = parse_batch(batch_spec)
            n = max(1, a.images // batch) * batch
            t0, c0 = time.perf_counter(), time.process_time()
            train_steps(loop, gen, batch, micro, a.images)
            if r:  # round 0 warms up
                key = f"{threads}:{kind}:{batch_spec}"
                wall[key].append(n / (time.perf_counter() - t0))
                cpu[key].append(n / (time.process_time() - c0))
    print(f"1-min load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"median of {a.rounds} rounds of {a.images} images")
    print("| variant (threads:dropout:batch[/micro]) | images/s (wall) | images per CPU-s | rounds (wall) |")
    print("|---|---|---|---|")
    for key in wall:
        print(f"| {key} | {statistics.median(wall[key]):.2f} | {statistics.median(cpu[key]):.2f} "
              f"| {', '.join(f'{x:.1f}' for x in wall[key])} |")


def memory_child(a: argparse.Namespace) -> None:
    import torch

    batch, micro = parse_batch(a.variants)
    _, loop = build(a.model, a.rank, a.dropout, RandomCache(batch))  # FastDropout: what `vitlora train` uses
    gen = torch.Generator().manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    train_steps(loop, gen, batch, micro, 3 * batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RESULT {base:.0f} {peak:.0f}")


def memory(a: argparse.Namespace) -> None:
    print("| batch[/micro] | RSS after load MB | peak RSS MB | added by 3 steps MB |")
    print("|---|---|---|---|")
    for spec in a.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--what", "memory-child", "--variants", spec,
                              "--model", a.model, "--rank", str(a.rank), "--dropout", str(a.dropout)],
                             capture_output=True, text=True, check=True).stdout
        base, peak = (float(x) for x in out.split("RESULT", 1)[1].split())
        print(f"| {spec} | {base:.0f} | {peak:.0f} | {peak - base:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=["step", "memory", "memory-child"], default="step")
    ap.add_argument("--variants", default="1:peft:32,1:fast:32,1:none:32")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--images", type=int, default=32, help="images per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"step": step, "memory": memory, "memory-child": memory_child}[a.what](a)


if __name__ == "__main__":
    main()
