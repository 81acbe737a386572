"""Many runs, one base in memory: LoRA adapters switch by name, each with its own head.

PEFT can hold several LoRA adapters on one model and switch with `set_adapter`, but
`modules_to_save` heads of different sizes (a 1001-class extend head beside a 3-class
replace head) do not fit one module. So the LoRA weights go into PEFT as named adapters
and the heads are kept here, swapped into the model under a lock for each batch.
Runs on different bases load each base once.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from ..errors import VitloraError


@dataclass
class _SharedBase:
    """One base model with every adapter that uses it."""

    model: nn.Module  # PeftModel once the first adapter is added
    head_name: str
    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock)
    heads: dict[str, nn.Linear] = field(default_factory=dict)


@dataclass
class LoadedAdapter:
    """A run served by name; implements the server's `Adapter` protocol."""

    name: str
    base_model: str
    labels: list[str]
    metrics: dict[str, Any]
    _base: _SharedBase
    _preprocess: Any
    multi_label: bool = False  # scores are per-label sigmoids (vitlora.multilabel)

    @torch.inference_mode()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        base = self._base
        with base.lock:
            base.model.set_adapter(self.name)
            inner = base.model.base_model.model
            setattr(inner, base.head_name, base.heads[self.name])
            return base.model(pixel_values=pixel_values.to(base.device)).logits.float().cpu()

    def predict(self, images: list[Image.Image], top_k: int) -> list[list[tuple[str, float]]]:
        from ..data import load_rgb, normalize, resize_for_eval
        from ..metrics import top_k_predictions
        from ..multilabel import probabilities

        batch = torch.stack([resize_for_eval(load_rgb(im), self._preprocess) for im in images])
        probs = probabilities(self.logits(normalize(batch, self._preprocess)), self.multi_label)
        return top_k_predictions(probs, dict(enumerate(self.labels)), top_k)


def _unique_name(run_dir: Path, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_dir.resolve().name).strip("-") or "adapter"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}-{i}", i + 1
    return name


def _metrics_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return {}
    m = json.loads(path.read_text())
    return {k: m.get(k) for k in ("best_epoch", "best_val_accuracy") if m.get(k) is not None} | {
        "epochs": len(m.get("epochs", []))}


def load_adapters(run_dirs: Sequence[str | Path], device: str = "auto") -> list[LoadedAdapter]:
    """Load runs as adapters over shared bases (first run = default adapter)."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..data import Preprocess
    from ..modeling import load_base
    from ..multilabel import is_multi_label_run
    from ..run import read_run_files
    from ..runtime import pick_device
    from ..surgery import find_head

    dev = pick_device(device)
    bases: dict[str, _SharedBase] = {}
    adapters: list[LoadedAdapter] = []
    for run in map(Path, run_dirs):
        meta, labels_info = read_run_files(run)
        base_id = meta["base_model"]
        if base_id not in bases:
            model, _ = load_base(base_id)
            head_name, _ = find_head(model)
            bases[base_id] = _SharedBase(model=model.to(dev), head_name=head_name, device=dev)
        shared = bases[base_id]
        name = _unique_name(run, {a.name for a in adapters})
        config = LoraConfig.from_pretrained(str(run))
        config.modules_to_save = None
        config.inference_mode = True
        state = load_file(str(run / "adapter_model.safetensors"))
        head_prefix = f"base_model.model.{shared.head_name}."
        head_state = {k[len(head_prefix):]: v for k, v in state.items() if k.startswith(head_prefix)}
        lora_state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
        if "weight" not in head_state:
            raise VitloraError(f"{run}: the adapter has no trained head ({shared.head_name})")
        if not isinstance(shared.model, PeftModel):
            shared.model = get_peft_model(shared.model, config, adapter_name=name)
        else:
            shared.model.add_adapter(name, config)
        result = set_peft_model_state_dict(shared.model, lora_state, adapter_name=name)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise VitloraError(f"{run}: the adapter does not fit base model {base_id} ({missing[0]})")
        weight = head_state["weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_state)
        head.load_state_dict(head_state)
        shared.heads[name] = head.to(dev).eval()
        shared.model.eval()
        id2label = labels_info["id2label"]
        adapters.append(LoadedAdapter(
            name=name, base_model=base_id, labels=[id2label[str(i)] for i in range(len(id2label))],
            metrics=_metrics_summary(run), _base=shared, _preprocess=Preprocess.from_dict(meta["processor"]),
            multi_label=is_multi_label_run(labels_info),
        ))
    return adapters
