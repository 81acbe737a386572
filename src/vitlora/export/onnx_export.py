"""`export_onnx`: a merged model to a verified ONNX folder (optionally with an int8 model).

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

import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vitlora.errors import VitloraError
from vitlora.export.common import (
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    ExportJob,
    ExportReport,
    LogitsOnly,
    one_line,
    require,
    staging,
)
from vitlora.export.int8 import MIN_AGREEMENT, quantize_int8
from vitlora.export.predictor import OnnxPredictor

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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
                LogitsOnly(model).eval(),
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
        raise VitloraError(f"ONNX export of {type(model).__name__} failed: {one_line(e)}") from e
    finally:
        registration_log.setLevel(old_level)


def _check_opset(opset: int | None) -> None:
    if opset is not None:
        max_opset = require("onnx").defs.onnx_opset_version()
        if not 7 <= opset <= max_opset:
            raise VitloraError(f"opset {opset} is out of range; the installed onnx supports 7..{max_opset}")


def write_verified_onnx(work: PreTrainedModel, images: torch.Tensor, path: Path, opset: int | None) -> int:
    """Export ``work`` to ``path`` and return the default-domain opset actually written."""
    # Batch 2 avoids torch.export specialising a 0/1-sized axis; own generator keeps global RNG untouched.
    example = torch.randn(2, *images.shape[1:], generator=torch.Generator().manual_seed(1))
    _save_onnx(work, example, path, opset)
    proto = require("onnx").load(str(path), load_external_data=False)
    written = next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and written != opset:
        raise VitloraError(
            f"asked for opset {opset} but the exporter could only produce opset {written}; "
            f"use opset {written} or newer, or leave it unset"
        )
    return written


def export_onnx(
    model: PreTrainedModel,
    out_dir: str | Path,
    preprocess: dict,
    opset: int | None = None,
    verify_images: torch.Tensor | None = None,
    *,
    overwrite: bool = False,
    int8: bool = False,
    min_agreement: float = MIN_AGREEMENT,
) -> ExportReport:
    """Export a merged image-classification model to ``out_dir`` and verify it with onnxruntime.

    ``opset=None`` uses torch's default. ``verify_images`` should be real preprocessed images;
    without them a seeded random batch of 2 is used. With ``int8`` the folder holds
    ``model.int8.onnx`` instead of ``model.onnx``: made from the verified fp32 graph and kept only
    if its top-1 agrees with fp32 on at least ``min_agreement`` of ``verify_images`` (real photos
    are then required; see `vitlora.export.int8`). Raises VitloraError if the export cannot be
    made or does not match; in that case ``out_dir`` is left exactly as it was.
    """
    for dep in ("onnx", "onnxscript", "onnxruntime"):
        require(dep)
    _check_opset(opset)
    if int8 and verify_images is None:
        raise VitloraError("an int8 export needs real photos to check its agreement on: pass verify_images")
    started = time.perf_counter()
    job = ExportJob.prepare(model, out_dir, preprocess, overwrite, verify_images)
    with staging(job.final, overwrite) as tmp:
        written = write_verified_onnx(job.work, job.images, tmp / MODEL_FILE, opset)
        job.write_sidecars(tmp)
        export_seconds = time.perf_counter() - started
        predictor = OnnxPredictor(tmp, int8=False)
        max_diff, top1_agree = job.verify(predictor, "ONNX")
        del predictor  # release the session (and its file handle) before renaming
        int8_report = quantize_int8(tmp, job.images.numpy(), min_agreement) if int8 else None
    return job.report(written, max_diff, top1_agree, export_seconds, int8_report)
