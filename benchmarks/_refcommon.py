"""Helpers the stand-alone benchmark scripts share (``reference_lab.py``, ``reference_guide.py``,
``ceiling.py``): process start time, peak RSS, image listing, Trainer rate, LoRA target names.

Standard library only at import time, and no vitlora: the references must measure the
pipelines they re-create, not ours. Import it first thing, so that ``T_IMPORT`` is as early as
Python code can see.
"""

from __future__ import annotations

import os
import resource
import time

T_IMPORT = time.time()  # earliest timestamp available to Python code
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def process_start_epoch() -> float:
    """Wall-clock time this process was started (from /proc/self/stat), else ``T_IMPORT``."""
    try:
        with open("/proc/self/stat") as fh:
            stat = fh.read()
        fields = stat.rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        now = time.time()
        start = now - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
        return min(start, T_IMPORT)
    except Exception:  # noqa: BLE001 - non-Linux
        return T_IMPORT


def peak_rss_mb() -> float:
    """ru_maxrss (KiB on Linux) of this process plus that of its waited-for children, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) / 1024.0


def list_images(folder: str) -> list:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))


def excl_eval_rate(trainer, n_images, train_wall):
    """Images / (seconds in trainer.train() minus the per-epoch evaluations' eval_runtime)."""
    hist = trainer.state.log_history
    evals = sum(r.get("eval_runtime", 0.0) for r in hist if "eval_runtime" in r)
    busy = train_wall - evals
    return n_images / busy if busy > 0 else None


def resolve_targets(model) -> list:
    """target_modules=["query", "value"] under the installed transformers' names (4.x / 5.x)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if {"query", "value"} <= names:
        return ["query", "value"]
    if {"q_proj", "v_proj"} <= names:
        return ["q_proj", "v_proj"]
    raise SystemExit(f"cannot find query/value projections in {type(model).__name__}")
