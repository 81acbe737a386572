#!/usr/bin/env python
"""What the hardware allows: the model's bare compute, with no pipeline around it.

Measures, in one process and interleaved (``--rounds`` rounds after a warm-up round, median):

* ``forward_fp32``: inference forward passes (``torch.inference_mode``) at ``--batch`` on random
  pixels, fp32 - no training pipeline can push images through a training step faster than this;
* ``step_fp32``: a bare LoRA training step (forward + backward, LoRA r=4 on query/value, head
  trainable, no dropout, no augmentation, no optimizer) at ``--batch`` - the floor of what
  any LoRA trainer's step costs on this machine;
* ``step_bf16``: the same step under ``torch.autocast("cpu", torch.bfloat16)`` - where the CPU
  has bf16 matrix units (AMX / AVX-512-BF16) this is the fast one, elsewhere it is emulated;
* ``startup_s``: process start to model loaded (importing torch, transformers and PEFT, and
  ``from_pretrained``) - what any PyTorch predict command pays before its first image, so
  ``startup_s + N / forward_fp32`` is the floor of an end-to-end predict over N images.

It imports transformers + PEFT only (not vitlora), prints one JSON line, and is what
``bench.py`` runs beside the pipelines so that a ratio target can be checked against the
machine: a training-throughput target above ``forward_fp32`` cannot be met in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from _refcommon import process_start_epoch, resolve_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/work/shared/models/deit-tiny-patch16-224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_pretrained(a.model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=resolve_targets(model),
                                                  modules_to_save=["classifier"]))
    startup_s = time.time() - process_start_epoch()
    x = torch.randn(a.batch, 3, 224, 224)

    def forward() -> None:
        peft_model.eval()
        with torch.inference_mode():
            peft_model(pixel_values=x)

    def step(dtype: torch.dtype | None) -> None:
        peft_model.train()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = peft_model(pixel_values=x).logits
        logits.float().logsumexp(-1).mean().backward()
        peft_model.zero_grad(set_to_none=True)

    variants = {"forward_fp32": forward, "step_fp32": lambda: step(None), "step_bf16": lambda: step(torch.bfloat16)}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(a.rounds + 1):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if r:  # round 0 warms up
                rates[name].append(a.batch / (time.perf_counter() - t0))
    out = {f"{k}_images_per_s": statistics.median(v) for k, v in rates.items()}
    out.update(startup_s=startup_s, batch=a.batch, rounds=a.rounds, torch_threads=torch.get_num_threads(),
               amx=bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
               avx512_bf16=bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
               loadavg=list(os.getloadavg()), all_rounds=rates)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
