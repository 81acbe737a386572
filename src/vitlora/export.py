"""Export a merged vitlora model to ONNX, verify it, and run it without PyTorch.

An export folder holds three files, all written together or not at all:

* ``model.onnx``: input ``pixel_values`` [batch, C, H, W] float32, output ``logits``
  [batch, num_labels]; the batch axis is dynamic, H and W are fixed.
* ``labels.json``: ``{"id2label": {"0": ..., "1": ...}}`` in index order, so a consumer
  needs neither transformers nor the model config to name a prediction.
* ``preprocessor_config.json``: the preprocessing dict exactly as given, so the images
  fed to ONNX are prepared the same way as during training.

Exporter choice: torch 2.13 defaults to the ``torch.export``-based exporter
(``dynamo=True``, needs onnxscript). The TorchScript exporter still exists but is
deprecated, traces Python-level shape checks into constants (TracerWarnings) and is
on its way out, so it is not used. The graph is exported with eager attention: it is the
reference math (plain MatMul/Softmax in ONNX, no SDPA decomposition with NaN guards),
and it also works when the model was loaded with a kernel-based implementation
(flash/flex) that cannot be captured on CPU.

An export is only kept if onnxruntime reproduces the PyTorch fp32 model (same top-1,
probabilities within ``PROB_TOLERANCE``) on the verification batch and on batches of
other sizes, checked through `OnnxPredictor`, i.e. the same path users load it with.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vitlora.errors import VitloraError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
PROB_TOLERANCE = 1e-4
_INSTALL_HINT = "pip install 'vitlora[onnx]'"


@dataclass(frozen=True)
class ExportReport:
    """What `export_onnx` wrote and how closely onnxruntime matched PyTorch.

    ``path`` is the export folder (what `OnnxPredictor` takes). ``opset`` is the
    default-domain opset actually written, which is what a runtime must support.
    ``export_seconds`` is the wall time until the files were written (verification excluded).
    """

    path: Path
    opset: int
    n_labels: int
    max_abs_prob_diff: float
    top1_agree: bool
    batch_sizes_checked: tuple[int, ...]
    export_seconds: float = 0.0


class _LogitsOnly(torch.nn.Module):
    """Give the exporter a one-tensor-in, one-tensor-out module.

    A ModelOutput (or a tuple when ``return_dict=False``) would otherwise leak optional
    fields into the graph signature; consumers only want ``logits``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        return out.logits if hasattr(out, "logits") else out[0]


def _require(module: str) -> Any:
    """Import an optional ONNX dependency, or tell the user how to get it."""
    try:
        return __import__(module)
    except ImportError as e:
        raise VitloraError(f"ONNX support needs the '{module}' package: {_INSTALL_HINT}") from e


def _one_line(e: BaseException) -> str:
    """First meaningful line of an exception, since VitloraError is printed on one line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text}"[:300]


def _labels(model: PreTrainedModel) -> list[str]:
    config = model.config
    n = int(config.num_labels or 0)
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    missing = [i for i in range(n) if i not in id2label]
    if n < 1 or missing:
        raise VitloraError(
            f"model config has num_labels={n} but id2label lacks ids {missing[:5]}; fix the config before exporting"
        )
    return [id2label[i] for i in range(n)]


def _input_size(model: PreTrainedModel, preprocess: dict, verify_images: torch.Tensor | None) -> tuple[int, int]:
    """(H, W) the graph is fixed to: the verification images if given (they come from the
    real preprocessing), else what the preprocessing produces, else the config's image_size."""
    if verify_images is not None:
        return int(verify_images.shape[-2]), int(verify_images.shape[-1])
    keys = (["crop_size"] if preprocess.get("do_center_crop") else []) + ["size"]
    for key in keys:
        size = preprocess.get(key)
        if isinstance(size, dict) and "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
    image_size = getattr(model.config, "image_size", None)
    if isinstance(image_size, int):
        return image_size, image_size
    if isinstance(image_size, (list, tuple)) and len(image_size) == 2:
        return int(image_size[0]), int(image_size[1])
    raise VitloraError(
        "cannot tell the input image size: pass verify_images or a preprocess dict with size height/width"
    )


def _verification_batches(images: torch.Tensor) -> list[torch.Tensor]:
    """The given batch plus differently sized ones (1 and n+1), to prove the batch axis is dynamic."""
    n = images.shape[0]
    batches = [images]
    if n != 1:
        batches.append(images[:1])
    batches.append(torch.cat([images, images[:1]]))
    return batches


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _save_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    """Run the torch.export-based exporter and write one self-contained model.onnx
    (torch switches to external data by itself above 2 GB)."""
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    old_level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # "torchvision is not installed" noise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.onnx.export(
                _LogitsOnly(model).eval(),
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={INPUT_NAME: {0: "batch"}},
                opset_version=opset,
                verbose=False,
            )
            assert program is not None  # dynamo=True always returns a program
            program.save(str(path), external_data=False)
    except VitloraError:
        raise
    except Exception as e:  # exporter errors are many types; the user needs one line
        raise VitloraError(f"ONNX export of {type(model).__name__} failed: {_one_line(e)}") from e
    finally:
        registration_log.setLevel(old_level)


def _written_opset(path: Path) -> int:
    onnx = _require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _publish(tmp: Path, final: Path) -> None:
    """Move the finished temp folder into place. The old export (if replaced) is moved
    aside first and deleted last, so `final` is always absent or complete."""
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    if final.exists():
        backup = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(backup)
        try:
            tmp.rename(final)
        except BaseException:
            backup.rename(final)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(final)


def _check_destination(final: Path, overwrite: bool) -> None:
    if final.exists() and not final.is_dir():
        raise VitloraError(f"{final} exists and is not a folder")
    if final.is_dir() and any(final.iterdir()):
        if not overwrite:
            raise VitloraError(f"{final} already exists and is not empty; choose another folder or use overwrite")
        if not (final / MODEL_FILE).exists():
            # Refuse to wipe a folder that is not a previous export (e.g. a typo'd path).
            raise VitloraError(f"{final} is not empty and holds no {MODEL_FILE}; refusing to replace it")


def export_onnx(
    model: PreTrainedModel,
    out_dir: str | Path,
    preprocess: dict,
    opset: int | None = None,
    verify_images: torch.Tensor | None = None,
    *,
    overwrite: bool = False,
) -> ExportReport:
    """Export a merged image-classification model to ``out_dir`` and verify it with onnxruntime.

    The caller's model is not modified: a CPU fp32 copy is exported (ONNX consumers expect
    fp32, and verification must compare like with like). ``opset=None`` uses torch's
    default. ``verify_images`` should be real preprocessed images; without them a seeded
    random batch of 2 is used. Raises VitloraError if the export cannot be made or does not
    match PyTorch; in that case ``out_dir`` is left exactly as it was.
    """
    from transformers import PreTrainedModel

    for dep in ("onnx", "onnxscript", "onnxruntime"):
        _require(dep)
    if not isinstance(model, PreTrainedModel):
        raise VitloraError(
            f"can only export a plain transformers model, got {type(model).__name__}; merge the LoRA adapter first"
        )
    try:
        preprocess_json = json.dumps(preprocess, indent=2)
    except (TypeError, ValueError) as e:
        raise VitloraError(f"preprocess dict is not JSON-serialisable: {e}") from e
    if opset is not None:
        max_opset = _require("onnx").defs.onnx_opset_version()
        if not 7 <= opset <= max_opset:
            raise VitloraError(f"opset {opset} is out of range; the installed onnx supports 7..{max_opset}")

    final = Path(out_dir).expanduser().resolve()
    _check_destination(final, overwrite)
    labels = _labels(model)
    channels = int(getattr(model.config, "num_channels", 3))
    height, width = _input_size(model, preprocess, verify_images)
    if verify_images is None:
        generator = torch.Generator().manual_seed(0)
        verify_images = torch.randn(2, channels, height, width, generator=generator)
    images = torch.as_tensor(verify_images).detach().to("cpu", torch.float32)
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] != channels:
        raise VitloraError(f"verify_images must be [batch, {channels}, H, W], got {list(images.shape)}")

    started = time.perf_counter()
    work = copy.deepcopy(model)
    work.to(device="cpu", dtype=torch.float32)  # type: ignore[call-arg]  # transformers' @wraps confuses mypy
    work.eval()
    # Reference first, with the attention the user runs (if CPU can run it), so the
    # check also covers the switch to eager below.
    if work.config._attn_implementation not in ("eager", "sdpa"):
        work.set_attn_implementation("eager")
    batches = _verification_batches(images)
    with torch.inference_mode():
        try:
            references = [_LogitsOnly(work)(b).numpy() for b in batches]
        except Exception as e:
            raise VitloraError(f"the PyTorch model cannot run on verify_images: {_one_line(e)}") from e
    if references[0].shape[-1] != len(labels):
        raise VitloraError(f"model outputs {references[0].shape[-1]} logits but config has {len(labels)} labels")
    work.set_attn_implementation("eager")

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:
        raise VitloraError(f"cannot write to {final.parent}: {e}") from e
    try:
        # Batch 2 avoids torch.export specialising a 0/1-sized axis; own generator keeps global RNG untouched.
        example = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(1))
        _save_onnx(work, example, tmp / MODEL_FILE, opset)
        written = _written_opset(tmp / MODEL_FILE)
        if opset is not None and written != opset:
            raise VitloraError(
                f"asked for opset {opset} but the exporter could only produce opset {written}; "
                f"use opset {written} or newer, or leave it unset"
            )
        (tmp / LABELS_FILE).write_text(
            json.dumps({"id2label": {str(i): name for i, name in enumerate(labels)}}, indent=2, ensure_ascii=False)
            + "\n",
            encoding="utf-8",
        )
        (tmp / PREPROCESSOR_FILE).write_text(preprocess_json + "\n", encoding="utf-8")
        export_seconds = time.perf_counter() - started

        predictor = OnnxPredictor(tmp)
        max_diff, top1_agree = 0.0, True
        for batch, ref in zip(batches, references, strict=True):
            got = predictor.logits(batch)
            if got.shape != ref.shape:
                raise VitloraError(f"ONNX model returned shape {got.shape} for a batch of {batch.shape[0]}")
            max_diff = max(max_diff, float(np.abs(_softmax(got) - _softmax(ref)).max()))
            top1_agree = top1_agree and bool((got.argmax(-1) == ref.argmax(-1)).all())
        del predictor  # release the session (and its file handle) before renaming
        if not top1_agree or max_diff > PROB_TOLERANCE:
            raise VitloraError(
                f"ONNX model does not match PyTorch (top-1 agree: {top1_agree}, "
                f"max prob diff {max_diff:.2e}, tolerance {PROB_TOLERANCE:g}); export discarded"
            )
        _check_destination(final, overwrite)  # again: the folder may have appeared during the export
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    return ExportReport(
        path=final,
        opset=written,
        n_labels=len(labels),
        max_abs_prob_diff=max_diff,
        top1_agree=top1_agree,
        batch_sizes_checked=tuple(int(b.shape[0]) for b in batches),
        export_seconds=export_seconds,
    )


class OnnxPredictor:
    """Classify preprocessed pixels with an exported folder, needing only onnxruntime and numpy.

    Preprocessing is not applied here: ``preprocess`` holds the dict to prepare images with,
    so serving code can pick its own image library.
    """

    def __init__(self, out_dir: str | Path, providers: Sequence[str] | None = None) -> None:
        ort = _require("onnxruntime")
        folder = Path(out_dir)
        for name in (MODEL_FILE, LABELS_FILE, PREPROCESSOR_FILE):
            if not (folder / name).is_file():
                raise VitloraError(f"{folder} is not a vitlora ONNX export: {name} is missing")
        try:
            id2label = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))["id2label"]
            self.labels: list[str] = [str(id2label[str(i)]) for i in range(len(id2label))]
            self.preprocess: dict = json.loads((folder / PREPROCESSOR_FILE).read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError) as e:
            raise VitloraError(f"{folder}: malformed {LABELS_FILE} or {PREPROCESSOR_FILE} ({_one_line(e)})") from e
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; ORT warns about unused initializers etc.
        try:
            self.session = ort.InferenceSession(
                str(folder / MODEL_FILE), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as e:
            raise VitloraError(f"onnxruntime cannot load {folder / MODEL_FILE}: {_one_line(e)}") from e
        model_input = self.session.get_inputs()[0]
        self.input_name: str = model_input.name
        self.input_shape: list[int | str | None] = list(model_input.shape)

    def logits(self, pixel_values: np.ndarray | torch.Tensor) -> np.ndarray:
        """Raw logits [batch, num_labels] as float32."""
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().cpu().numpy()
        x = np.ascontiguousarray(pixel_values, dtype=np.float32)
        fixed = self.input_shape[1:]
        if (
            x.ndim != 4
            or x.shape[0] < 1
            or any(isinstance(d, int) and d != s for d, s in zip(fixed, x.shape[1:], strict=True))
        ):
            raise VitloraError(
                f"pixel_values must be shaped [batch, {', '.join(map(str, fixed))}], got {list(x.shape)}"
            )
        try:
            return self.session.run(None, {self.input_name: x})[0]
        except Exception as e:  # e.g. an export whose batch axis is not dynamic
            raise VitloraError(f"onnxruntime failed on a batch of {x.shape[0]}: {_one_line(e)}") from e

    def predict_pixels(self, pixel_values: np.ndarray | torch.Tensor, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the ``top_k`` (label, softmax probability) pairs, most likely first."""
        if top_k < 1:
            raise VitloraError(f"top_k must be at least 1, got {top_k}")
        probs = _softmax(self.logits(pixel_values))
        k = min(top_k, probs.shape[-1])
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        return [[(self.labels[j], float(p[j])) for j in row] for p, row in zip(probs, order, strict=True)]
