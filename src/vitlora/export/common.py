"""What every export format shares: the folder layout, label/size checks, numeric comparison,
and the staging folder that is published all at once or not at all."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vitlora.errors import VitloraError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MODEL_FILE = "model.onnx"
INT8_MODEL_FILE = "model.int8.onnx"
OPENVINO_MODEL_FILE = "model.xml"  # OpenVINO IR: model.xml + model.bin
LABELS_FILE = "labels.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
MODEL_FILES = (MODEL_FILE, INT8_MODEL_FILE, OPENVINO_MODEL_FILE)
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
PROB_TOLERANCE = 1e-4
_INSTALL_HINT = {"openvino": "pip install 'vitlora[openvino]'"}


@dataclass(frozen=True)
class Int8Report:
    """How the int8 model compares with the verified fp32 one it was made from."""

    size_ratio: float  # int8 file bytes / fp32 file bytes
    top1_agreement: float  # fraction of the verification images with the same top-1
    n_images: int
    method: str


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how closely the runtime matched PyTorch.

    ``path`` is the export folder (what `OnnxPredictor` / `OpenVinoPredictor` take). ``opset``
    is the default-domain ONNX opset written (0 for OpenVINO IR). ``export_seconds`` is the wall
    time until the files were written (verification excluded). ``int8`` is set for int8 exports.
    """

    path: Path
    opset: int
    n_labels: int
    max_abs_prob_diff: float
    top1_agree: bool
    batch_sizes_checked: tuple[int, ...]
    export_seconds: float = 0.0
    int8: Int8Report | None = None

    def describe(self) -> str:
        """The line `vitlora export` prints."""
        fmt = f"opset {self.opset}" if self.opset else "OpenVINO IR"
        text = (
            f"wrote {self.path}: {self.n_labels} labels, {fmt}; verified against PyTorch at batch sizes "
            f"{self.batch_sizes_checked} (top-1 agree: {self.top1_agree}, max prob diff {self.max_abs_prob_diff:.1e})"
        )
        if self.int8:
            text += (
                f"; int8 model {self.int8.size_ratio:.2f}x the fp32 size, top-1 agrees with fp32 on "
                f"{100 * self.int8.top1_agreement:.1f} % of {self.int8.n_images} photos"
            )
        return text


class LogitsOnly(torch.nn.Module):
    """Give exporters a one-tensor-in, one-tensor-out module.

    A ModelOutput (or a tuple when ``return_dict=False``) would otherwise leak optional
    fields into the graph signature; consumers only want ``logits``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        return out.logits if hasattr(out, "logits") else out[0]


def require(module: str) -> Any:
    """Import an optional export dependency, or tell the user how to get it."""
    try:
        return __import__(module)
    except ImportError as e:
        hint = _INSTALL_HINT.get(module, "pip install 'vitlora[onnx]'")
        raise VitloraError(f"this export needs the '{module}' package: {hint}") from e


def one_line(e: BaseException) -> str:
    """First meaningful line of an exception, since VitloraError is printed on one line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text}"[:300]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def model_labels(model: PreTrainedModel) -> list[str]:
    config = model.config
    n = int(config.num_labels or 0)
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    missing = [i for i in range(n) if i not in id2label]
    if n < 1 or missing:
        raise VitloraError(
            f"model config has num_labels={n} but id2label lacks ids {missing[:5]}; fix the config before exporting"
        )
    return [id2label[i] for i in range(n)]


def input_size(model: PreTrainedModel, preprocess: dict, verify_images: torch.Tensor | None) -> tuple[int, int]:
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


def verification_batches(images: torch.Tensor) -> list[torch.Tensor]:
    """The given batch plus differently sized ones (1 and n+1), to prove the batch axis is dynamic."""
    n = images.shape[0]
    batches = [images]
    if n != 1:
        batches.append(images[:1])
    batches.append(torch.cat([images, images[:1]]))
    return batches


def compare(got: list[np.ndarray], references: list[np.ndarray], runtime: str) -> tuple[float, bool]:
    """(max abs probability difference, top-1 identical everywhere) of a runtime vs PyTorch."""
    max_diff, top1_agree = 0.0, True
    for g, ref in zip(got, references, strict=True):
        if g.shape != ref.shape:
            raise VitloraError(f"{runtime} returned shape {g.shape} for a batch of {ref.shape[0]}")
        max_diff = max(max_diff, float(np.abs(softmax(g) - softmax(ref)).max()))
        top1_agree = top1_agree and bool((g.argmax(-1) == ref.argmax(-1)).all())
    if not top1_agree or max_diff > PROB_TOLERANCE:
        raise VitloraError(
            f"{runtime} model does not match PyTorch (top-1 agree: {top1_agree}, "
            f"max prob diff {max_diff:.2e}, tolerance {PROB_TOLERANCE:g}); export discarded"
        )
    return max_diff, top1_agree


def check_preprocess(preprocess: dict) -> str:
    try:
        return json.dumps(preprocess, indent=2)
    except (TypeError, ValueError) as e:
        raise VitloraError(f"preprocess dict is not JSON-serialisable: {e}") from e


def write_sidecars(folder: Path, labels: list[str], preprocess_json: str, problem_type: str | None = None) -> None:
    """labels.json (index order; `problem_type` for a multi-label model, whose scores are sigmoids)
    and preprocessor_config.json, so a consumer needs neither transformers nor the model config
    to prepare an image and name a prediction."""
    doc: dict = {"id2label": {str(i): name for i, name in enumerate(labels)}}
    if problem_type:
        doc["problem_type"] = problem_type
    (folder / LABELS_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / PREPROCESSOR_FILE).write_text(preprocess_json + "\n", encoding="utf-8")


def read_sidecars(folder: Path) -> tuple[list[str], dict]:
    """Labels in index order and the preprocessing dict of an export folder."""
    try:
        id2label = read_labels_doc(folder)["id2label"]
        labels = [str(id2label[str(i)]) for i in range(len(id2label))]
        preprocess = json.loads((folder / PREPROCESSOR_FILE).read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError) as e:
        raise VitloraError(f"{folder}: malformed {LABELS_FILE} or {PREPROCESSOR_FILE} ({one_line(e)})") from e
    return labels, preprocess


def check_destination(final: Path, overwrite: bool) -> None:
    if final.exists() and not final.is_dir():
        raise VitloraError(f"{final} exists and is not a folder")
    if final.is_dir() and any(final.iterdir()):
        if not overwrite:
            raise VitloraError(f"{final} already exists and is not empty; choose another folder or use overwrite")
        if not any((final / name).exists() for name in MODEL_FILES):
            # Refuse to wipe a folder that is not a previous export (e.g. a typo'd path).
            raise VitloraError(f"{final} is not empty and holds no exported model; refusing to replace it")


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


@contextmanager
def staging(final: Path, overwrite: bool) -> Iterator[Path]:
    """A temp folder beside ``final``; published when the block ends cleanly, removed otherwise,
    so ``final`` is left exactly as it was on any error or interrupt."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:
        raise VitloraError(f"cannot write to {final.parent}: {e}") from e
    try:
        yield tmp
        check_destination(final, overwrite)  # again: the folder may have appeared during the export
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def real_images(model: PreTrainedModel, preprocess: dict, verify_images: torch.Tensor | None) -> torch.Tensor:
    """The verification batch as CPU fp32 [n, C, H, W]: the caller's real preprocessed images, or
    a seeded random batch of 2 (own generator, so the global RNG is untouched)."""
    channels = int(getattr(model.config, "num_channels", 3))
    if verify_images is None:
        height, width = input_size(model, preprocess, None)
        return torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    images = torch.as_tensor(verify_images).detach().to("cpu", torch.float32)
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] != channels:
        raise VitloraError(f"verify_images must be [batch, {channels}, H, W], got {list(images.shape)}")
    return images


def reference(model: PreTrainedModel, images: torch.Tensor, n_labels: int) -> tuple[PreTrainedModel, list, list]:
    """A CPU fp32 eager-attention copy of ``model`` (the caller's is not modified; exported
    runtimes expect fp32 and verification must compare like with like), the verification
    batches, and PyTorch's logits on them.

    The reference is computed with the attention the user runs (if the CPU can run it)
    before switching to eager for export, so the check also covers that switch.
    """
    work = copy.deepcopy(model)
    work.to(device="cpu", dtype=torch.float32)  # type: ignore[call-arg]  # transformers' @wraps confuses mypy
    work.eval()
    if work.config._attn_implementation not in ("eager", "sdpa"):
        work.set_attn_implementation("eager")
    batches = verification_batches(images)
    with torch.inference_mode():
        try:
            references = [LogitsOnly(work)(b).numpy() for b in batches]
        except Exception as e:
            raise VitloraError(f"the PyTorch model cannot run on verify_images: {one_line(e)}") from e
    if references[0].shape[-1] != n_labels:
        raise VitloraError(f"model outputs {references[0].shape[-1]} logits but config has {n_labels} labels")
    work.set_attn_implementation("eager")
    return work, batches, references


def check_model(model: Any) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise VitloraError(
            f"can only export a plain transformers model, got {type(model).__name__}; merge the LoRA adapter first"
        )


def read_labels_doc(folder: Path) -> dict:
    """An export folder's labels.json as written by `write_sidecars`."""
    return json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))


@dataclass
class ExportJob:
    """What every exporter checks and prepares before writing anything: the same for ONNX and OpenVINO."""

    final: Path
    preprocess_json: str
    labels: list[str]
    problem_type: str | None
    images: torch.Tensor
    work: Any  # the CPU fp32 eager copy that is exported
    batches: list
    references: list

    @classmethod
    def prepare(cls, model: PreTrainedModel, out_dir: str | Path, preprocess: dict, overwrite: bool,
                verify_images: torch.Tensor | None) -> ExportJob:
        """Model, preprocessing and destination checked; the PyTorch reference logits computed."""
        check_model(model)
        preprocess_json = check_preprocess(preprocess)
        final = Path(out_dir).expanduser().resolve()
        check_destination(final, overwrite)
        labels = model_labels(model)
        images = real_images(model, preprocess, verify_images)
        work, batches, references = reference(model, images, len(labels))
        return cls(final, preprocess_json, labels, getattr(model.config, "problem_type", None), images, work,
                   batches, references)

    def write_sidecars(self, folder: Path) -> None:
        write_sidecars(folder, self.labels, self.preprocess_json, self.problem_type)

    def verify(self, predictor: Any, runtime: str) -> tuple[float, bool]:
        """(max probability difference, top-1 identical) of ``predictor`` against PyTorch."""
        return compare([predictor.logits(b) for b in self.batches], self.references, runtime)

    def report(self, opset: int, max_diff: float, top1_agree: bool, export_seconds: float,
               int8: Any = None) -> ExportReport:
        return ExportReport(path=self.final, opset=opset, n_labels=len(self.labels), max_abs_prob_diff=max_diff,
                            top1_agree=top1_agree, batch_sizes_checked=tuple(int(b.shape[0]) for b in self.batches),
                            export_seconds=export_seconds, int8=int8)
