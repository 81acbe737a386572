#!/usr/bin/env python
"""Measure vitlora's CPU speed levers one at a time, side by side in one process.

``step`` (default): the LoRA training step on DeiT-tiny (extend head, LoRA on query/value, the
real augmentation from a uint8 cache), for variants ``THREADS:DROPOUT:BATCH[/MICRO]``:

* ``DROPOUT``: ``peft`` (PEFT's ``nn.Dropout``), ``fast`` (``vitlora.speed.FastDropout``, what
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


def build(model_path: str, rank: int, dropout: float):
    import torch

    from vitlora.data.transforms import Preprocess
    from vitlora.modeling import load_base, load_processor_config, wrap_lora
    from vitlora.surgery import extend_head
    from vitlora.targets import resolve_targets

    torch.manual_seed(0)
    pp = Preprocess.from_dict(load_processor_config(model_path))
    model, _ = load_base(model_path)
    change = extend_head(model, ["raccoon"])
    targets = resolve_targets(model, ["query", "value"], change.head_name)
    peft_model = wrap_lora(model, targets, change.head_name, rank, 2 * rank, dropout)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    return peft_model, opt, pp


def parse_batch(text: str) -> tuple[int, int]:
    batch, _, micro = text.partition("/")
    return int(batch), int(micro or batch)


def train_steps(peft_model, opt, pp, cache, gen, batch: int, micro: int, images: int) -> None:
    import torch
    import torch.nn.functional as F

    from vitlora.data.transforms import random_resized_crop_flip

    for _ in range(max(1, images // batch)):
        idx = torch.randint(0, len(cache), (batch,), generator=gen)
        for part in idx.split(micro):
            x = random_resized_crop_flip(cache[part], pp, generator=gen)
            labels = torch.full((len(part),), 1000)
            loss = F.cross_entropy(peft_model(pixel_values=x).logits.float(), labels) * (len(part) / batch)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def step(a: argparse.Namespace) -> None:
    import torch

    from vitlora import speed

    peft_model, opt, pp = build(a.model, a.rank, a.dropout)
    drops = [m.lora_dropout for m in peft_model.modules() if isinstance(getattr(m, "lora_dropout", None),
                                                                            torch.nn.ModuleDict)]

    def set_dropout(kind: str) -> None:
        for d in drops:
            for name in list(d.keys()):
                d[name] = {"peft": lambda: torch.nn.Dropout(a.dropout), "fast": lambda: speed.FastDropout(a.dropout),
                           "none": torch.nn.Identity}[kind]()
        peft_model.train()

    cache = torch.randint(0, 256, (128, 3, 256, 256), dtype=torch.uint8)
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
            train_steps(peft_model, opt, pp, cache, gen, batch, micro, a.images)
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

    peft_model, opt, pp = build(a.model, a.rank, a.dropout)
    from vitlora import speed

    speed.use_fast_lora_dropout(peft_model)
    batch, micro = parse_batch(a.variants)
    cache = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    train_steps(peft_model, opt, pp, cache, gen, batch, micro, 3 * batch)
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
