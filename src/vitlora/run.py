"""A trained run: its directory layout, loading it back, predicting, and merging.

Layout of RUN_DIR (the artifact contract, see README):
    adapter_config.json, adapter_model.safetensors   PEFT adapter, trained head included
    labels.json                                       id2label / label2id, new labels, mode
    preprocessor_config.json                          the base model's image processor
    vitlora.json                                      exact settings + provenance (run marker)
    metrics.json, training_curves.png, README.md      results and model card
    checkpoints/last/                                 resume state (optimizer, RNG, history)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image
from torch import nn

from .artifacts import check_out_dir, publish_dir, staging_dir, write_json_atomic
from .errors import VitloraError
from .metrics import top_k_predictions
from .modeling import RUN_MARKER, is_run_dir, load_base, quiet_transformers
from .runtime import pick_device, pick_precision


@dataclass
class Prediction:
    """Top-k labels for one image."""

    path: str
    top_k: list[tuple[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "top_k": [{"label": lab, "score": score} for lab, score in self.top_k]}


@dataclass
class Run:
    """A loaded run: model (merged or with its adapter), labels, preprocessing and settings."""

    run_dir: Path
    model: nn.Module
    id2label: dict[int, str]
    preprocess: Any  # vitlora.data.Preprocess
    settings: dict[str, Any]
    labels_info: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(len(self.id2label))]

    @property
    def new_labels(self) -> list[str]:
        return list(self.labels_info.get("new_labels", []))

    @torch.inference_mode()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits for normalised pixel values [B,3,H,W]."""
        x = pixel_values.to(self.device, non_blocking=True)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is None:
            return self.model(pixel_values=x).logits.float()
        with torch.autocast(self.device.type, dtype=dtype):
            return self.model(pixel_values=x).logits.float()

    def predict_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities for normalised pixel values."""
        return torch.softmax(self.logits(pixel_values), dim=-1).cpu()

    def predict(
        self,
        images: Sequence[str | Path | Image.Image],
        top_k: int = 5,
        batch_size: int = 32,
        skipped: list[tuple[str, str]] | None = None,
    ) -> list[Prediction]:
        """Top-k predictions for image files or PIL images.

        Files are decoded ahead in worker threads so decoding overlaps compute; unreadable
        files are left out of the result and listed in `skipped` when a list is given.
        """
        from .data import load_rgb, normalize, resize_for_eval, stream_decoded

        if top_k < 1:
            raise VitloraError("--top-k must be at least 1")
        out: list[Prediction] = []
        pil = [im for im in images if isinstance(im, Image.Image)]
        if pil:
            for start in range(0, len(pil), batch_size):
                chunk = pil[start : start + batch_size]
                batch = torch.stack([resize_for_eval(load_rgb(im), self.preprocess) for im in chunk])
                probs = self.predict_pixels(normalize(batch, self.preprocess))
                for i, tops in enumerate(top_k_predictions(probs, self.id2label, top_k)):
                    out.append(Prediction(f"<image {start + i}>", tops))
        paths = [str(p) for p in images if not isinstance(p, Image.Image)]
        if paths:
            out.extend(self.predict_decoded(stream_decoded(paths, self.preprocess, batch_size), top_k, skipped))
        return out

    def predict_decoded(
        self,
        batches: Iterable[tuple[torch.Tensor, list[str], Any]],
        top_k: int = 5,
        skipped: list[tuple[str, str]] | None = None,
    ) -> list[Prediction]:
        """Top-k predictions for `(uint8 [b,3,H,W], paths, SkipReport)` batches from `stream_decoded`."""
        from .data import normalize

        if top_k < 1:
            raise VitloraError("--top-k must be at least 1")
        out: list[Prediction] = []
        for batch, batch_paths, report in batches:
            if skipped is not None:
                skipped.extend(report.skipped)
            if len(batch_paths) == 0:
                continue
            probs = self.predict_pixels(normalize(batch, self.preprocess))
            for path, tops in zip(batch_paths, top_k_predictions(probs, self.id2label, top_k)):
                out.append(Prediction(path, tops))
        return out

    def merge(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write a plain transformers model folder with the adapter folded into the weights."""
        out = check_out_dir(out_dir, overwrite, what="OUT_DIR")
        model = self.model
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model = model.to("cpu", dtype=torch.float32)
        with staging_dir(out.resolve().parent) as tmp:
            staged = tmp / "model"
            model.save_pretrained(staged, safe_serialization=True)
            write_json_atomic(staged / "preprocessor_config.json", self.settings.get("processor", {}))
            write_json_atomic(staged / "labels.json", self.labels_info)
            publish_dir(staged, out)
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VitloraError(f"cannot read {path}: {exc}") from None


def read_run_files(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(vitlora.json, labels.json) of a run, with a clear error when it is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VitloraError(f"run directory not found: {run_dir}")
    if not is_run_dir(run_dir):
        raise VitloraError(f"{run_dir} is not a vitlora run (no {RUN_MARKER} and adapter_config.json)")
    return _read_json(run_dir / RUN_MARKER), _read_json(run_dir / "labels.json")


def load(
    run_dir: str | Path,
    device: str = "auto",
    merge: bool = True,
    precision: str = "fp32",
    base_model: str | None = None,
) -> Run:
    """Load a run for inference. `merge=True` folds LoRA into the weights (fastest inference).

    `base_model` overrides the base recorded in `vitlora.json` (e.g. the run was moved to
    another machine where the base lives elsewhere).
    """
    quiet_transformers()
    from .data import Preprocess
    from .surgery import find_head

    run_dir = Path(run_dir)
    meta, labels_info = read_run_files(run_dir)
    id2label = {int(k): v for k, v in labels_info["id2label"].items()}
    base_id = base_model or meta["base_model"]
    model, _ = load_base(base_id)
    expected = meta.get("base_fingerprint")
    if expected and expected != base_fingerprint(model, exclude_head=True):
        raise VitloraError(
            f"base model {base_id} does not match the adapter in {run_dir} "
            f"(trained on {meta['base_model']}: {expected['model_type']}, hidden size {expected['hidden_size']}, "
            f"{expected['layers']} layers)"
        )
    head_name, head = find_head(model)
    if head.out_features != len(id2label):
        setattr(model, head_name, nn.Linear(head.in_features, len(id2label)))
    model.config.num_labels = len(id2label)
    model.config.id2label = id2label
    model.config.label2id = {v: k for k, v in id2label.items()}
    from .speed import merge_adapter_fast

    # merged inference of a plain LoRA adapter needs no PEFT (whose import alone costs seconds)
    if not (merge and merge_adapter_fast(model, run_dir)):
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(run_dir))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise VitloraError(
                f"the adapter in {run_dir} does not fit base model {base_id}: {str(exc).splitlines()[0]}"
            ) from None
        if merge:
            model = model.merge_and_unload()
    dev = pick_device(device)
    prec, _ = pick_precision(precision, dev) if precision == "auto" else (precision, "")
    model = model.to(dev).eval()
    return Run(
        run_dir=run_dir,
        model=model,
        id2label=id2label,
        preprocess=Preprocess.from_dict(meta["processor"]),
        settings=meta,
        labels_info=labels_info,
        device=dev,
        precision=prec,
    )


def predict_files(
    run_dir: str | Path,
    paths: Sequence[str],
    device: str = "auto",
    precision: str = "auto",
    top_k: int = 5,
    batch_size: int = 32,
    skipped: list[tuple[str, str]] | None = None,
) -> list[Prediction]:
    """`vitlora predict`: load a run and predict image files, as fast as the machine allows.

    The compute threads are fitted to the cores other processes leave free (see
    `vitlora.runtime`), with one decode thread per ~4 cores beside them (decoding is ~1/5
    of the work). Decoding is not started before the model is loaded: measured on 2 shared
    cores, decode threads running during the imports slowed them more (the GIL) than the
    decoding they got done.
    """
    from .data import stream_decoded
    from .runtime import CpuWatch, tune_threads, usable_cores

    watch = CpuWatch()
    run = load(run_dir, device=device, precision=precision)
    tune_threads(run.device, watch)
    batches = stream_decoded(paths, run.preprocess, batch_size, num_threads=max(1, usable_cores() // 4))
    return run.predict_decoded(batches, top_k=top_k, skipped=skipped)


def base_fingerprint(model: nn.Module, exclude_head: bool = True) -> dict[str, Any]:
    """A small description of the backbone, to catch an adapter loaded onto the wrong base."""
    cfg = model.config
    return {
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "image_size": getattr(cfg, "image_size", None),
    }
