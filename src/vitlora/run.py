"""A trained run loaded back: predicting with it and merging it (its files: `vitlora.rundir`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image
from torch import nn

from . import multilabel
from .errors import VitloraError
from .metrics import top_k_predictions
from .modeling import load_run_model, quiet_transformers
from .rundir import LABELS, PREPROCESSOR, check_destination, publish_dir, read_run_files, staging_dir, write_json_atomic
from .runtime import autocast, pick_device, pick_precision

__all__ = ["Prediction", "Run", "load", "prediction", "predict_files", "read_run_files"]  # read_run_files: vitlora.serve uses it


@dataclass
class Prediction:
    """Top-k labels for one image."""

    path: str
    top_k: list[tuple[str, float]]
    labels: list[str] | None = None  # multi-label runs: every label at or over its threshold
    rejected: bool | None = None  # runs trained with --negatives in replace mode: top-1 is "unknown"

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"path": self.path, "top_k": [{"label": lab, "score": s} for lab, s in self.top_k]}
        if self.labels is not None:
            row["labels"] = self.labels
        if self.rejected is not None:
            row["rejected"] = self.rejected
        return row


def prediction(labels_info: dict[str, Any], path: str, top_k: list[tuple[str, float]],
               labels: list[str] | None = None) -> Prediction:
    """A Prediction, flagged `rejected` when the run has an "unknown" answer (labels.json "rejection")."""
    rejection = labels_info.get("rejection")
    return Prediction(path, top_k, labels, top_k[0][0] == rejection["label"] if rejection else None)


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
        with autocast(self.device, self.precision):
            return self.model(pixel_values=x).logits.float()

    @property
    def multi_label(self) -> bool:
        return multilabel.is_multi_label_run(self.labels_info)

    def predict_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Probabilities for normalised pixel values: softmax, or one sigmoid per label (multi-label)."""
        return multilabel.probabilities(self.logits(pixel_values), self.multi_label).cpu()

    def _predictions(self, probs: torch.Tensor, paths: Sequence[str], top_k: int) -> list[Prediction]:
        """Top-k of each row, and for a multi-label run the labels over their thresholds."""
        tops = top_k_predictions(probs, self.id2label, top_k)
        if not self.multi_label:
            return [prediction(self.labels_info, p, t) for p, t in zip(paths, tops)]
        over = multilabel.over_threshold(probs, self.id2label, multilabel.thresholds_of(self.labels_info,
                                                                                        self.id2label))
        return [prediction(self.labels_info, p, t, labs) for p, t, labs in zip(paths, tops, over)]

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

        _check_predict_args(top_k, batch_size)
        out: list[Prediction] = []
        pil = [im for im in images if isinstance(im, Image.Image)]
        if pil:
            for start in range(0, len(pil), batch_size):
                chunk = pil[start : start + batch_size]
                batch = torch.stack([resize_for_eval(load_rgb(im), self.preprocess) for im in chunk])
                probs = self.predict_pixels(normalize(batch, self.preprocess))
                out.extend(self._predictions(probs, [f"<image {start + i}>" for i in range(len(chunk))], top_k))
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

        _check_predict_args(top_k, 1)
        out: list[Prediction] = []
        for batch, batch_paths, report in batches:
            if skipped is not None:
                skipped.extend(report.skipped)
            if len(batch_paths) == 0:
                continue
            probs = self.predict_pixels(normalize(batch, self.preprocess))
            out.extend(self._predictions(probs, batch_paths, top_k))
        return out

    def merge(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write a plain transformers model folder with the adapter folded into the weights."""
        out = check_destination(out_dir, self.run_dir, overwrite, kind_file="config.json")
        model = self.model
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model = model.to("cpu", dtype=torch.float32)
        with staging_dir(out.resolve().parent) as tmp:
            staged = tmp / "model"
            model.save_pretrained(staged, safe_serialization=True)
            write_json_atomic(staged / PREPROCESSOR, self.settings.get("processor", {}))
            write_json_atomic(staged / LABELS, self.labels_info)
            publish_dir(staged, out)
        return out


def _check_predict_args(top_k: int, batch_size: int) -> None:
    if top_k < 1:
        raise VitloraError("--top-k must be at least 1")
    if batch_size < 1:
        raise VitloraError("--batch-size must be at least 1")


def inference_precision(requested: str, device: torch.device) -> str:
    """Inference `auto` is fp32 on every device: probabilities then match `pipeline()` on the merged model to
    1e-3 (bf16 autocast moved them by up to 0.036); bf16/fp16 only when asked for (and supported)."""
    return "fp32" if requested == "auto" else pick_precision(requested, device)[0]


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

    model, meta, labels_info = load_run_model(run_dir, merge=merge, base_model=base_model)
    if multilabel.is_multi_label_run(labels_info):  # so a merged config.json makes pipeline() use sigmoid
        model.config.problem_type = multilabel.PROBLEM_TYPE
    dev = pick_device(device)
    prec = inference_precision(precision, dev)
    return Run(
        run_dir=Path(run_dir),
        model=model.to(dev).eval(),
        id2label={int(k): v for k, v in labels_info["id2label"].items()},
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

    _check_predict_args(top_k, batch_size)
    watch = CpuWatch()
    run = load(run_dir, device=device, precision=precision)
    tune_threads(run.device, watch)
    batches = stream_decoded(paths, run.preprocess, batch_size, num_threads=max(1, usable_cores() // 4))
    return run.predict_decoded(batches, top_k=top_k, skipped=skipped)
