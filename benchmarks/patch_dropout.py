#!/usr/bin/env python
"""Bare LoRA training step on DeiT-tiny at several PatchDropout keep fractions (issue 12, goal 1).

One step = forward + backward + AdamW step of DeiT-tiny with LoRA (rank 8, alpha 16, dropout 0.1, on
query/value) and the 1000-class head trained in full, batch 32 of random normalised 224x224 pixels,
bf16 autocast where the CPU has AVX-512-BF16 or AMX (else fp32; ``--precision`` forces one). Keep
fractions run round-robin (one warm-up round, then ``--repeats`` rounds) so background load hits them
alike; each line is the median images/s (wall clock, and per CPU-second of this process: the steadier
figure on a machine others are using, comparable only at equal ``--threads``) and its ratio to the
first keep (1.0 = all 197 tokens).

Example::

    python benchmarks/patch_dropout.py --keeps 1.0,0.75,0.5,0.25 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _cpu import cpu_line

from vitlora.patch_dropout import PatchDropout, kept_tokens
from vitlora.targets import resolve_targets

DEIT = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "deit-tiny-patch16-224"


def lora_deit(path: Path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(path)
    targets = resolve_targets(model, ["query", "value"], "classifier")
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=targets, modules_to_save=["classifier"])
    return get_peft_model(model, cfg).train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEIT))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--keeps", default="1.0,0.75,0.5,0.25")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    keeps = [float(k) for k in a.keeps.split(",")]
    bf16 = a.precision == "bf16" or (a.precision == "auto" and torch.cpu._is_avx512_bf16_supported())
    model = lora_deit(Path(a.model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (a.batch,), generator=g)
    hooks = {k: PatchDropout(k, generator=g) for k in keeps}

    def step(keep: float) -> tuple[float, float]:
        hooks[keep].attach(model)
        t, c = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits = model(pixel_values=x).logits
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        hooks[keep].detach()
        return a.batch / wall, a.batch / cpu

    print(cpu_line())
    print(f"DeiT-tiny LoRA step (fwd+bwd+AdamW), batch {a.batch}, {'bf16 autocast' if bf16 else 'fp32'}, "
          f"median of {a.repeats} after 1 warm-up, round-robin")
    rates: dict[float, list[tuple[float, float]]] = {k: [] for k in keeps}
    for r in range(a.repeats + 1):
        for k in keeps:
            rate = step(k)
            if r:
                rates[k].append(rate)
    wall0 = statistics.median(w for w, _ in rates[keeps[0]])
    cpu0 = statistics.median(c for _, c in rates[keeps[0]])
    for k in keeps:
        wall, cpu = statistics.median(w for w, _ in rates[k]), statistics.median(c for _, c in rates[k])
        print(f"keep {k:4.2f} ({1 + kept_tokens(196, k):3d} tokens): {wall:6.1f} img/s ({wall / wall0:4.2f}x), "
              f"{cpu:6.1f} img/CPU-s ({cpu / cpu0:4.2f}x)   wall runs: {', '.join(f'{w:.1f}' for w, _ in rates[k])}")


if __name__ == "__main__":
    main()
