"""Device, precision, threads and distributed setup.

`--precision auto` must pick what is *fast on this hardware* without losing accuracy.
On CPUs bf16 only pays with AMX or AVX-512-BF16 matrix units; without them PyTorch
emulates bf16 and it is several times slower than fp32 (measured on a Cascade Lake
Xeon: 0.05 vs 0.24 TFLOP/s), so auto falls back to fp32 there.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .errors import VitloraError


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed, plus this process's place in a DDP group."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    reason: str  # why this precision was picked, printed to the user
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward pass; a no-op in fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix hardware (AMX tiles or AVX-512-BF16)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in probes:
        fn = getattr(torch.cpu, name, None)
        if fn is not None:
            with contextlib.suppress(Exception):
                if fn():
                    return True
    return False


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VitloraError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if requested == "cuda":
            return torch.device("cuda", local_rank)
    return torch.device(requested)


def pick_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """Return (precision, reason)."""
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            if bf16_ok:
                return "bf16", "GPU supports bf16"
            return "fp16", "GPU has no bf16; fp16 with loss scaling"
        if requested == "bf16" and not bf16_ok:
            raise VitloraError("this GPU does not support bf16; use --precision fp16 or fp32")
        return requested, "as requested"
    if requested == "fp16":
        raise VitloraError("--precision fp16 is for GPUs; on CPU use bf16 or fp32")
    if requested == "auto":
        if cpu_has_fast_bf16():
            return "bf16", "CPU has AMX/AVX-512-BF16 matrix units"
        return "fp32", "CPU has no bf16 matrix units (AMX/AVX-512-BF16), where bf16 would be slower"
    return requested, "as requested"


def setup(device: str = "auto", precision: str = "auto") -> Runtime:
    """Initialise torch.distributed when launched by torchrun/accelerate, pick device and precision."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group(backend=backend)
    if dev.type == "cpu":
        # share the machine's cores between local processes instead of oversubscribing
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    prec, reason = pick_precision(precision, dev)
    return Runtime(dev, prec, reason, rank=rank, world_size=world_size, local_rank=local_rank)


def teardown(rt: Runtime) -> None:
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        torch.distributed.barrier()
