"""Run an export folder without PyTorch: `OnnxPredictor` (onnxruntime) and the shared
`Predictor` interface that `OpenVinoPredictor` also follows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vitlora.errors import VitloraError
from vitlora.export.common import (
    INT8_MODEL_FILE,
    LABELS_FILE,
    MODEL_FILE,
    PREPROCESSOR_FILE,
    one_line,
    read_labels_doc,
    read_sidecars,
    require,
    softmax,
)


class Predictor:
    """Classify preprocessed pixels with an export folder; subclasses provide `_run`.

    Preprocessing is not applied here: ``preprocess`` holds the dict to prepare images with,
    so serving code can pick its own image library.
    """

    runtime = "runtime"
    kind = "exported"
    labels: list[str]
    preprocess: dict
    input_shape: list[int | str | None]

    def _load_sidecars(self, folder: Path, model_file: str) -> None:
        for name in (model_file, LABELS_FILE, PREPROCESSOR_FILE):
            if not (folder / name).is_file():
                raise VitloraError(f"{folder} is not a vitlora {self.kind} export: {name} is missing")
        self.labels, self.preprocess = read_sidecars(folder)
        self.multi_label = read_labels_doc(folder).get("problem_type") == "multi_label_classification"

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

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
            return np.asarray(self._run(x), dtype=np.float32)
        except Exception as e:  # e.g. an export whose batch axis is not dynamic
            raise VitloraError(f"{self.runtime} failed on a batch of {x.shape[0]}: {one_line(e)}") from e

    def predict_pixels(self, pixel_values: np.ndarray | torch.Tensor, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the ``top_k`` (label, probability) pairs, most likely first (sigmoids for multi-label)."""
        if top_k < 1:
            raise VitloraError(f"top_k must be at least 1, got {top_k}")
        logits = self.logits(pixel_values)
        probs = 1.0 / (1.0 + np.exp(-logits)) if self.multi_label else softmax(logits)
        k = min(top_k, probs.shape[-1])
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        return [[(self.labels[j], float(p[j])) for j in row] for p, row in zip(probs, order, strict=True)]


def onnx_model_file(folder: Path, int8: bool | None) -> str:
    """Which model file to run: ``int8=None`` takes the one the folder holds (fp32 if both),
    True/False insist on int8/fp32."""
    if int8 is None:
        return MODEL_FILE if (folder / MODEL_FILE).is_file() or not (folder / INT8_MODEL_FILE).is_file() \
            else INT8_MODEL_FILE
    if int8 and not (folder / INT8_MODEL_FILE).is_file():
        raise VitloraError(f"{folder} holds no int8 model ({INT8_MODEL_FILE}); export it with int8 first")
    return INT8_MODEL_FILE if int8 else MODEL_FILE


class OnnxPredictor(Predictor):
    """An ONNX export run by onnxruntime, needing only onnxruntime and numpy.

    ``int8``: None runs whichever model the folder holds (``model.onnx``, else
    ``model.int8.onnx``); True/False insist on the int8/fp32 one. ``threads`` caps onnxruntime's
    intra-op threads (None: its default, all cores).
    """

    runtime = "onnxruntime"
    kind = "ONNX"

    def __init__(
        self,
        out_dir: str | Path,
        providers: Sequence[str] | None = None,
        int8: bool | None = None,
        threads: int | None = None,
    ) -> None:
        ort = require("onnxruntime")
        folder = Path(out_dir)
        self.model_file = onnx_model_file(folder, int8)
        self._load_sidecars(folder, self.model_file)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; ORT warns about unused initializers etc.
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(folder / self.model_file),
                sess_options=options,
                providers=list(providers or ["CPUExecutionProvider"]),
            )
        except Exception as e:
            raise VitloraError(f"onnxruntime cannot load {folder / self.model_file}: {one_line(e)}") from e
        model_input = self.session.get_inputs()[0]
        self.input_name: str = model_input.name
        self.input_shape = list(model_input.shape)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]
