"""Device, precision, threads and distributed setup.

`--precision auto` must pick what is *fast on this hardware* without losing accuracy.
On CPUs bf16 only pays with AMX or AVX-512-BF16 matrix units; without them PyTorch
emulates bf16 and it is several times slower than fp32 (measured on a Cascade Lake
Xeon: 0.05 vs 0.24 TFLOP/s), so auto falls back to fp32 there.

Threads on CPU: PyTorch's OpenMP threads spin-wait at every parallel region, so when other
processes keep the machine's cores busy, a thread that is descheduled stalls all the others
(measured on 2 shared cores at load ~7: a DeiT-tiny training step ran 1.8x faster with 1
thread than with 2; tiny ops were 10-50x slower). So, unless the user fixed the count
(`OMP_NUM_THREADS` or `VITLORA_THREADS`), vitlora uses the cores that are actually free:
the usable cores (affinity mask and cgroup CPU quota, not the host's count), split between
the local processes of a DDP group, minus what *other* processes were seen using
(`CpuWatch`, from /proc/stat minus our own CPU time), re-checked once per epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

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
    local_world_size: int = 1
    cpu_watch: CpuWatch = field(default_factory=lambda: CpuWatch(), compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward pass; a no-op in fp32."""
        return autocast(self.device, self.precision)


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (fp32: None, no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes at `precision`; a no-op in fp32."""
    dtype = amp_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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


def usable_cores() -> int:
    """Cores this process may run on: the affinity mask, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = None
    with contextlib.suppress(OSError, ValueError):
        text = open("/sys/fs/cgroup/cpu.max").read().split()
        if text[0] != "max":
            quota = int(text[0]) / int(text[1])
    if quota is None:
        with contextlib.suppress(OSError, ValueError):
            q = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
            if q > 0:
                quota = q / int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 0.01)))
    return max(1, cores)


def fixed_threads() -> int | None:
    """The thread count the user asked for (`VITLORA_THREADS`, else `OMP_NUM_THREADS`), if any."""
    for name in ("VITLORA_THREADS", "OMP_NUM_THREADS"):
        with contextlib.suppress(ValueError):
            n = int(os.environ.get(name, ""))
            if n >= 1:
                return n
    return None


class CpuWatch:
    """How many cores *other* processes used since the last look (Linux /proc/stat; else 0)."""

    def __init__(self) -> None:
        self._last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal (guest time is already in user)
        busy = sum(fields[:3]) + sum(fields[5:8])
        own = os.times()
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system

    def others(self) -> float:
        """Average cores used by other processes (and the hypervisor's steal) since the last call."""
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[0] - last[0] < 0.05:
            return 0.0
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0]))


def pick_threads(cores: int, others: float) -> int:
    """Cores free of other work, rounded down unless nearly a whole core is free (>= 0.7)."""
    return max(1, min(cores, int(cores - others + 0.3)))


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
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if dev.type == "cpu":
        # share the usable cores between local processes instead of oversubscribing
        torch.set_num_threads(fixed_threads() or max(1, usable_cores() // max(1, local_world)))
    prec, reason = pick_precision(precision, dev)
    return Runtime(dev, prec, reason, rank=rank, world_size=world_size, local_rank=local_rank,
                   local_world_size=max(1, local_world))


def adapt_threads(rt: Runtime) -> str | None:
    """Re-pick the CPU thread count from what other processes used since the last call.

    Only for a single CPU process whose user did not fix the count; returns a line to log
    when the count changes.
    """
    return tune_threads(rt.device, rt.cpu_watch, rt.local_world_size)


def tune_threads(device: torch.device, watch: CpuWatch, local_world_size: int = 1) -> str | None:
    """:func:`adapt_threads` for callers without a :class:`Runtime` (e.g. ``vitlora predict``)."""
    if device.type != "cpu" or local_world_size > 1 or fixed_threads() is not None:
        return None
    cores = usable_cores()
    others = watch.others()
    threads = pick_threads(cores, others)
    if threads == torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    return (f"threads: {threads} of {cores} cores (other processes used {others:.1f} cores; "
            "set VITLORA_THREADS to fix the count)")


def teardown(rt: Runtime) -> None:
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        torch.distributed.barrier()


def release_memory() -> bool:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``); False where unavailable.

    glibc keeps what a phase frees (decode threads' buffers, inference activations of the
    set-up passes) in its arenas, where the training step's allocations often cannot reuse
    it; the resident set then carries it through training. Trimming once between phases
    costs milliseconds, unlike a low ``M_MMAP_THRESHOLD``, which also bounds this but made
    every training step ~35% slower (page faults) on a 2-core Cascade Lake.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
