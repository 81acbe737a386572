"""LoRA on a classifier: wrapping it with PEFT, a cheaper dropout kernel, and merging a saved adapter.

Like PEFT's split of *what* (`LoraConfig`) from *the math* (`layer.py`): `wrap_lora` says which
layers get LoRA, the rest is the per-layer computation vitlora changes (both measured, see
benchmarks/levers.py):

* :class:`FastDropout` replaces PEFT's ``nn.Dropout`` in every LoRA layer. PEFT applies the
  LoRA dropout to the *full* activation in front of ``lora_A`` (``[B, 197, 192]`` per target
  for DeiT-tiny), and on CPU ``F.dropout`` draws one float from PyTorch's serial Mersenne
  Twister per element (``bernoulli_``), then divides and multiplies. Measured on a 2-core
  Cascade Lake (1 thread, [32, 197, 192]): ~23 ms per call forward + backward, more than the
  layer's frozen query projection. ``FastDropout`` takes 16 random bits per element from
  NumPy's PCG64 raw output (four elements per 64-bit draw) and multiplies by the resulting
  mask: ~6 ms. In a whole DeiT-tiny step (1 thread, CPU time) PEFT's dropout cost 32% of
  the step; this one ~14%. It returns its input untouched outside training. Same
  distribution up to the 1/65536 resolution of ``p`` (the scale uses the effective ``p``, so
  the expectation is exact); the module has no state, so saved adapters are plain PEFT
  adapters and load with ``PeftModel.from_pretrained``. Non-CPU tensors use the native
  fused kernel.
* :func:`merge_adapter_fast` folds a saved vanilla-LoRA adapter into a base model without
  importing PEFT (its import costs seconds of process start-up, which dominates a short
  ``vitlora predict``); anything it does not recognise falls back to PEFT.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def wrap_lora(
    model: nn.Module,
    target_modules: list[str],
    head_name: str,
    rank: int,
    alpha: float,
    dropout: float,
    method: str = "lora",
) -> nn.Module:
    """Freeze the base, add the adapter to the targets, train the head in full (`modules_to_save`).

    `method` picks peft's own variant: lora, dora (`use_dora`), rslora (`use_rslora`), or
    peft's LoHa / LoKr (Hadamard / Kronecker products; `dropout` is their rank dropout). Every
    one saves as a plain peft adapter that `PeftModel.from_pretrained` reloads and merges.
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

    common = {"r": rank, "target_modules": target_modules, "modules_to_save": [head_name]}
    if method in ("loha", "lokr"):
        config = (LoHaConfig if method == "loha" else LoKrConfig)(alpha=alpha, rank_dropout=dropout, **common)
    else:
        config = LoraConfig(lora_alpha=alpha, lora_dropout=dropout, bias="none", use_dora=method == "dora",
                            use_rslora=method == "rslora", **common)
    return get_peft_model(model, config)


ADAPTER_MARKERS = ("lora_", "hada_", "lokr_")  # names of adapter weights (LoRA/DoRA, LoHa, LoKr), not the head's


def is_adapter_weight(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) as PEFT's `print_trainable_parameters` reports them."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# ------------------------------------------------------------------------- dropout

_BITS = 16
_LEVELS = 1 << _BITS


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype = torch.float32,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted-dropout multiplier: ``1 / (1 - p)`` for kept elements, 0 for dropped ones (i.i.d.).

    ``p`` is rounded to a multiple of 1/65536 and the scale uses that effective ``p``, so the
    expectation is exactly 1. The NumPy bit generator is seeded from torch's RNG
    (``generator`` or the default one), so ``torch.manual_seed`` and checkpointed RNG state
    reproduce the masks.
    """
    threshold = int(round(p * _LEVELS))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    n = math.prod(shape)
    bits = np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n]  # 4 draws per 64-bit output
    keep = torch.from_numpy((bits >= threshold).view(np.uint8)).view(shape)
    return keep.to(dtype).mul_(_LEVELS / (_LEVELS - threshold))


class FastDropout(nn.Dropout):
    """Drop-in for ``nn.Dropout`` in LoRA layers: same ``p``, cheaper mask on CPU (see module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace:
            return F.dropout(x, self.p, True, self.inplace)
        return x * keep_mask(x.shape, self.p, x.dtype)


def use_fast_lora_dropout(model: nn.Module) -> int:
    """Swap every LoRA layer's ``nn.Dropout`` for :class:`FastDropout`; returns how many."""
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is nn.Dropout:
                drops[name] = FastDropout(drop.p)
                swapped += 1
    return swapped


# ------------------------------------------------------------------------- merging without PEFT

_PREFIX = "base_model.model."
# adapter_config.json keys that do not change what a merged LoRA layer computes
_HARMLESS = frozenset({
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "peft_type", "peft_version",
    "inference_mode", "init_lora_weights", "lora_dropout", "modules_to_save", "target_modules",
    "exclude_modules", "r", "lora_alpha", "use_rslora", "bias", "layers_pattern", "megatron_core",
    "qalora_group_size",
})


def _plain_lora(cfg: dict[str, Any]) -> bool:
    """Vanilla LoRA: every setting beyond rank/alpha/targets is off (no DoRA, patterns, variants, LoRA bias)."""
    plain = cfg.get("peft_type") == "LORA" and isinstance(cfg.get("r"), int) and cfg.get("bias", "none") == "none"
    return plain and all(key in _HARMLESS or value in (None, False, {}, [], "none", "") for key, value in cfg.items())


def merge_adapter_fast(model: nn.Module, adapter_dir: str | Path) -> bool:
    """Fold a saved PEFT LoRA adapter into ``model`` in place, without importing PEFT.

    Handles what ``vitlora train`` writes: vanilla LoRA (no DoRA, no LoRA bias, no
    rank/alpha patterns) on ``nn.Linear`` layers plus full ``modules_to_save`` copies.
    The merge is PEFT's ``W += (B @ A) * alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), in
    float32. Returns False, leaving ``model`` untouched, when the adapter is anything else
    (the caller then uses PEFT).
    """
    adapter_dir = Path(adapter_dir)
    cfg_file, weights_file = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not (cfg_file.is_file() and weights_file.is_file()):
        return False
    cfg: dict[str, Any] = json.loads(cfg_file.read_text())
    if not _plain_lora(cfg):
        return False
    from safetensors.torch import load_file

    state = load_file(str(weights_file))
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    scaling = alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(_PREFIX):
            return False
        name = key[len(_PREFIX):]
        if ".lora_A." in name or ".lora_B." in name:
            which = "A" if ".lora_A." in name else "B"
            module_name, rest = name.split(".lora_A." if which == "A" else ".lora_B.", 1)
            if rest != "weight":
                return False
            pairs.setdefault(module_name, {})[which] = value
        else:
            whole[name] = value
    updates: list[tuple[torch.Tensor, torch.Tensor]] = []
    for module_name, ab in pairs.items():
        layer = modules.get(module_name)
        if not isinstance(layer, nn.Linear) or set(ab) != {"A", "B"}:
            return False
        a, b = ab["A"].float(), ab["B"].float()
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]:
            return False
        updates.append((layer.weight, (b @ a) * scaling))
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for name, value in whole.items():
        target = params.get(name)
        if target is None or target.shape != value.shape:
            return False
        updates.append((target, value))
    with torch.no_grad():
        for i, (target, value) in enumerate(updates):
            if i < len(pairs):
                target.add_(value.to(target.dtype))
            else:
                target.copy_(value)
    return True
