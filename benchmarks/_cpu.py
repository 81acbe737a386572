"""One line describing the CPU a benchmark ran on: model name and torch's bf16 / AMX probes."""

from __future__ import annotations

import subprocess

import torch


def cpu_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        model = "?"
    bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return (f"cpu: {model}; avx512_bf16={bf16} amx={amx}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
