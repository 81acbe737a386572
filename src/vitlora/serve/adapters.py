"""Many runs, one base in memory, one forward pass for a batch that mixes them.

PEFT holds several LoRA adapters on one model and, given ``adapter_names=[...]``
in ``forward``, applies each row's own adapter (peft's mixed-batch inference).
What PEFT cannot mix are classification heads of different sizes (a 1001-class
extend head beside a 3-class replace head: ``modules_to_save`` would pick one
head for the whole batch, peft#2136). So the base model's head is replaced by
``nn.Identity``: one forward pass yields every row's features under its own
LoRA, and each run's head (kept here) is applied to its rows. Runs on different
bases load each base once and batch separately.

PEFT's mixed batch loops over the adapters in every LoRA layer: with 16
adapters that is ~16x more small ops, which measured 3-4x slower per batch on
a busy 2-core CPU (thread barriers on tiny ops). So, as multi-LoRA servers do
(punica's "BGMV"), every layer's LoRA matrices are stacked once and a mixed
batch adds ``B[row] @ A[row] @ x`` with two batched matmuls per layer,
whatever the number of adapters; the base runs with PEFT's adapters disabled.
Layers PEFT computes differently (DoRA, non-Linear) keep PEFT's own path.

Explanations (``?explain=true``) run Grad-CAM through the same shared base, under
the lock every batch takes: one adapter via peft's plain path (the stacked hooks
are off outside a mixed batch), then the run's own head, in fp32.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from ..errors import VitloraError

#: Long side of the explanation overlay at most, in px (the web page shows it beside the bars).
EXPLAIN_MAX_SIDE = 768


@dataclass
class _Rows:
    """Which stacked adapter each row of the batch in flight uses (None: hooks off)."""

    index: torch.Tensor | None = None


def _stacked_delta(
    a: torch.Tensor, b: torch.Tensor, rows: _Rows, _module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
) -> torch.Tensor | None:
    """Forward hook: add each row's own LoRA update, two batched matmuls for all adapters."""
    if rows.index is None:
        return None
    x = args[0]
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
    delta = torch.bmm(torch.bmm(flat, a[rows.index].transpose(1, 2)), b[rows.index].transpose(1, 2))
    return output + delta.reshape(output.shape).to(output.dtype)


def _stack_loras(model: nn.Module, names: list[str], rows: _Rows) -> bool:
    """Hook a stacked copy of every adapter's LoRA onto each layer; False (nothing hooked) if unsupported."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and any(n in m.lora_A for n in names)]
    if not all(isinstance(m, LoraLinear) and not getattr(m, "lora_variant", {}) for m in layers):
        return False
    for m in layers:
        rank = max((m.r[n] for n in names if n in m.lora_A), default=0)
        base = m.get_base_layer()
        a = torch.zeros(len(names), rank, base.in_features, device=base.weight.device)
        b = torch.zeros(len(names), base.out_features, rank, device=base.weight.device)
        for i, n in enumerate(names):
            if n in m.lora_A:  # an adapter that skips this layer keeps zeros: no update
                a[i, : m.r[n]] = m.lora_A[n].weight
                b[i, :, : m.r[n]] = m.lora_B[n].weight * m.scaling[n]
        m.register_forward_hook(partial(_stacked_delta, a, b, rows))
    return True


class _WithHead(nn.Module):
    """The shared backbone (its head is ``nn.Identity``) then one run's head: what Grad-CAM needs."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.config = backbone.config  # explain_pixels reads the patch size

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        out = self.backbone(pixel_values=pixel_values, output_hidden_states=output_hidden_states)
        return ImageClassifierOutput(logits=self.head(out.logits), hidden_states=out.hidden_states)


@dataclass
class _SharedBase:
    """One base model with every adapter that uses it; the server's batch group."""

    model: nn.Module  # PeftModel once the first adapter is added; head replaced by Identity
    head_name: str
    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock)
    heads: dict[str, nn.Linear] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    multi_label: set[str] = field(default_factory=set)  # adapters whose scores are per-label sigmoids
    rows: _Rows = field(default_factory=_Rows)
    stacked: dict[str, int] = field(default_factory=dict)  # adapter -> index in the stacked LoRA

    def stack(self) -> None:
        """Once every adapter is loaded: stacked LoRA for mixed batches (when the layers allow it)."""
        names = list(self.heads)
        if _stack_loras(self.model, names, self.rows):
            self.stacked = {n: i for i, n in enumerate(names)}

    def _features(self, pixel_values: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        if len(set(names)) == 1:  # one adapter: peft's plain path
            self.model.set_adapter(names[0])
            return self.model(pixel_values=pixel_values).logits
        if not self.stacked:
            return self.model(pixel_values=pixel_values, adapter_names=list(names)).logits
        self.rows.index = torch.tensor([self.stacked[n] for n in names], device=self.device)
        try:
            with self.model.disable_adapter():  # base only; the hooks add each row's LoRA
                return self.model(pixel_values=pixel_values).logits
        finally:
            self.rows.index = None

    @torch.inference_mode()
    def logits(self, pixel_values: torch.Tensor, names: Sequence[str]) -> list[torch.Tensor]:
        """Per-row logits: shared backbone with per-row LoRA, then each row's own head."""
        with self.lock:
            features = self._features(pixel_values.to(self.device), names)
        out: list[torch.Tensor] = [torch.empty(0)] * len(names)
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            for i, row in zip(rows, self.heads[name](features[rows]).float().cpu()):
                out[i] = row
        return out

    def _pixels(self, image: Image.Image, name: str) -> torch.Tensor:
        """One image as adapter `name`'s model input [3, H, W] (its run's eval preprocessing)."""
        from ..data import load_rgb, normalize, resize_for_eval

        pp = self.preprocess[name]
        return normalize(resize_for_eval(load_rgb(image), pp).unsqueeze(0), pp)[0]

    def predict_mixed(
        self, images: list[Image.Image], names: list[str], top_k: int
    ) -> list[list[tuple[str, float]]]:
        """Top-k per image, each image classified by the adapter named beside it."""
        from ..metrics import top_k_predictions
        from ..multilabel import probabilities

        pixels = torch.stack([self._pixels(im, n) for im, n in zip(images, names)])
        return [
            top_k_predictions(probabilities(row[None], name in self.multi_label),
                              dict(enumerate(self.labels[name])), top_k)[0]
            for name, row in zip(names, self.logits(pixels, names))
        ]

    def explain(self, image: Image.Image, name: str, label: str) -> torch.Tensor:
        """Grad-CAM heat of `label` on the patch grid, for one image under adapter `name` (fp32).

        Holds the lock that every batch's forward takes, so the adapter switch can
        neither leak into a batch in flight nor be undone by one.
        """
        from ..explain import explain_pixels

        x = self._pixels(image, name)[None].to(self.device)
        with self.lock:
            self.model.set_adapter(name)
            grid, _ = explain_pixels(_WithHead(self.model, self.heads[name]), x, self.labels[name].index(label))
        return grid


@dataclass
class LoadedAdapter:
    """A run served by name; implements the server's `Adapter` protocol."""

    name: str
    base_model: str
    labels: list[str]
    metrics: dict[str, Any]
    batch_group: _SharedBase

    def predict(self, images: list[Image.Image], top_k: int) -> list[list[tuple[str, float]]]:
        return self.batch_group.predict_mixed(images, [self.name] * len(images), top_k)

    def explain(self, image: Image.Image, label: str, max_side: int = EXPLAIN_MAX_SIDE) -> bytes:
        """PNG: Grad-CAM heat of `label` over the photo, shrunk to at most `max_side` px (same aspect).

        The heat comes from the full image (what the model classified) and is mapped
        onto the thumbnail through the eval geometry.
        """
        from ..explain import heat_to_photo, overlay_png

        grid = self.batch_group.explain(image, self.name, label)
        shown = image.copy()
        shown.thumbnail((max_side, max_side))
        return overlay_png(shown, heat_to_photo(grid, shown.size, self.batch_group.preprocess[self.name]))


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


def public_model_name(model_id: str) -> str:
    """A hub id as is; a local folder by its last component only (no local paths are served)."""
    path = Path(model_id)
    if path.is_absolute() or path.exists() or model_id.startswith(("~", ".")):
        return path.name or "local-model"
    return model_id


def _new_base(base_id: str, dev: torch.device, meta: dict[str, Any], run: Path) -> _SharedBase:
    from ..modeling import base_fingerprint, load_base
    from ..surgery import find_head

    model, _ = load_base(base_id)
    expected = meta.get("base_fingerprint")
    if expected and expected != base_fingerprint(model):
        raise VitloraError(f"base model {base_id} does not match the adapter in {run}")
    head_name, _ = find_head(model)
    setattr(model, head_name, nn.Identity())  # heads are per run, applied by _SharedBase.logits
    return _SharedBase(model=model.to(dev).eval(), head_name=head_name, device=dev)


def _split_state(run: Path, head_name: str, labels: list[str]) -> tuple[dict[str, torch.Tensor], nn.Linear]:
    """(LoRA weights, the run's head) from its adapter file; refuses a head that labels.json does not fit."""
    from safetensors.torch import load_file

    state = load_file(str(run / "adapter_model.safetensors"))
    prefix = f"base_model.model.{head_name}."
    head_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "weight" not in head_state:
        raise VitloraError(f"{run}: the adapter has no trained head ({head_name})")
    weight = head_state["weight"]
    if weight.shape[0] != len(labels):
        raise VitloraError(
            f"{run}: labels.json names {len(labels)} labels but the trained head has {weight.shape[0]} outputs "
            "(the run is inconsistent; restore its labels.json or train it again)"
        )
    head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_state)
    head.load_state_dict(head_state)
    return {k: v for k, v in state.items() if not k.startswith(prefix)}, head


def load_adapters(run_dirs: Sequence[str | Path], device: str = "auto") -> list[LoadedAdapter]:
    """Load runs as adapters over shared bases (first run = default adapter)."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    from ..data import Preprocess
    from ..run import read_run_files
    from ..multilabel import is_multi_label_run
    from ..runtime import pick_device

    dev = pick_device(device)
    bases: dict[str, _SharedBase] = {}
    adapters: list[LoadedAdapter] = []
    for run in map(Path, run_dirs):
        meta, labels_info = read_run_files(run)
        base_id = meta["base_model"]
        id2label = labels_info["id2label"]
        labels = [id2label[str(i)] for i in range(len(id2label))]
        if base_id not in bases:
            bases[base_id] = _new_base(base_id, dev, meta, run)
        shared = bases[base_id]
        lora_state, head = _split_state(run, shared.head_name, labels)
        name = _unique_name(run, {a.name for a in adapters})
        config = LoraConfig.from_pretrained(str(run))
        config.modules_to_save = None
        config.inference_mode = True
        if not isinstance(shared.model, PeftModel):
            shared.model = get_peft_model(shared.model, config, adapter_name=name)
        else:
            shared.model.add_adapter(name, config)
        result = set_peft_model_state_dict(shared.model, lora_state, adapter_name=name)
        unfit = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unfit:
            raise VitloraError(f"{run}: the adapter does not fit base model {base_id} ({unfit[0]})")
        shared.heads[name] = head.to(dev).eval()
        shared.labels[name] = labels
        shared.preprocess[name] = Preprocess.from_dict(meta["processor"])
        if is_multi_label_run(labels_info):
            shared.multi_label.add(name)
        shared.model.eval()
        adapters.append(LoadedAdapter(
            name=name, base_model=public_model_name(base_id), labels=labels,
            metrics=_metrics_summary(run), batch_group=shared,
        ))
    for shared in bases.values():
        shared.stack()
    return adapters
