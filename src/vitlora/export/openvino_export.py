"""`export_openvino`: a merged model to a verified OpenVINO IR folder, and `OpenVinoPredictor`.

The IR is converted from the ONNX graph `export_onnx` writes (``openvino.convert_model`` reads
ONNX natively), so both formats share one capture of the model. Two OpenVINO defaults would
break the fp32 promise and are turned off: ``save_model`` compresses weights to fp16, and the
CPU plugin runs in bf16 on CPUs with bf16 units; the predictor pins
``INFERENCE_PRECISION_HINT=f32``. Kept only if OpenVINO reproduces PyTorch like the ONNX export
(same top-1, probabilities within ``PROB_TOLERANCE``, several batch sizes).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vitlora.errors import VitloraError
from vitlora.export.common import (
    MODEL_FILE,
    OPENVINO_MODEL_FILE,
    ExportJob,
    ExportReport,
    one_line,
    require,
    staging,
)
from vitlora.export.onnx_export import write_verified_onnx
from vitlora.export.predictor import Predictor

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _onnx_to_ir(onnx_path: Path, xml_path: Path) -> None:
    ov = require("openvino")
    try:
        ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    except Exception as e:
        raise VitloraError(f"OpenVINO conversion failed: {one_line(e)}") from e


def export_openvino(
    model: PreTrainedModel,
    out_dir: str | Path,
    preprocess: dict,
    verify_images: torch.Tensor | None = None,
    *,
    overwrite: bool = False,
) -> ExportReport:
    """Export to ``out_dir`` as OpenVINO IR (``model.xml`` + ``model.bin``, fp32) and verify it.

    Same contract as `export_onnx`: the caller's model is not modified, ``verify_images`` should
    be real preprocessed images, and on any error ``out_dir`` is left exactly as it was.
    """
    for dep in ("onnx", "onnxscript", "openvino"):
        require(dep)
    started = time.perf_counter()
    job = ExportJob.prepare(model, out_dir, preprocess, overwrite, verify_images)
    with staging(job.final, overwrite) as tmp:
        write_verified_onnx(job.work, job.images, tmp / MODEL_FILE, None)
        _onnx_to_ir(tmp / MODEL_FILE, tmp / OPENVINO_MODEL_FILE)
        (tmp / MODEL_FILE).unlink()
        job.write_sidecars(tmp)
        export_seconds = time.perf_counter() - started
        predictor = OpenVinoPredictor(tmp)
        max_diff, top1_agree = job.verify(predictor, "OpenVINO")
        del predictor
    return job.report(0, max_diff, top1_agree, export_seconds)


class OpenVinoPredictor(Predictor):
    """An OpenVINO IR export run on the CPU in fp32; same interface as `OnnxPredictor`.

    ``threads`` caps OpenVINO's inference threads (None: its default).
    """

    runtime = "OpenVINO"
    kind = "OpenVINO"

    def __init__(self, out_dir: str | Path, threads: int | None = None) -> None:
        ov = require("openvino")
        folder = Path(out_dir)
        self._load_sidecars(folder, OPENVINO_MODEL_FILE)
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = ov.Core().compile_model(str(folder / OPENVINO_MODEL_FILE), "CPU", config)
        except Exception as e:
            raise VitloraError(f"OpenVINO cannot load {folder / OPENVINO_MODEL_FILE}: {one_line(e)}") from e
        shape = self.compiled.input(0).get_partial_shape()
        self.input_shape = [d.get_length() if d.is_static else None for d in shape]
        self._request = self.compiled.create_infer_request()

    def _run(self, x: np.ndarray) -> np.ndarray:
        return np.array(self._request.infer({0: x})[0], copy=True)
