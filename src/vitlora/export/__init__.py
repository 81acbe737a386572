"""Export a merged vitlora model to ONNX (fp32 or int8) or OpenVINO, verify it, and run it
without PyTorch.

An export folder holds, all written together or not at all:

* the model: ``model.onnx`` (fp32), ``model.int8.onnx`` (int8 export) or ``model.xml`` +
  ``model.bin`` (OpenVINO IR). Input ``pixel_values`` [batch, C, H, W] float32, output
  ``logits`` [batch, num_labels]; the batch axis is dynamic, H and W are fixed.
* ``labels.json``: ``{"id2label": {"0": ..., "1": ...}}`` in index order, so a consumer
  needs neither transformers nor the model config to name a prediction.
* ``preprocessor_config.json``: the preprocessing dict exactly as given, so the images
  fed to the runtime are prepared the same way as during training.

Modules: `common` (layout, checks, staging), `onnx_export`, `int8`, `openvino_export`,
`predictor` (the runtimes behind one interface), `photos` (real photos to verify on),
`from_run` (`export_run`, what `vitlora export` calls).
"""

from vitlora.export.common import (
    INT8_MODEL_FILE,
    LABELS_FILE,
    MODEL_FILE,
    OPENVINO_MODEL_FILE,
    PREPROCESSOR_FILE,
    PROB_TOLERANCE,
    ExportReport,
    Int8Report,
)
from vitlora.export.from_run import export_run, open_export
from vitlora.export.onnx_export import export_onnx
from vitlora.export.openvino_export import OpenVinoPredictor, export_openvino
from vitlora.export.predictor import OnnxPredictor, Predictor

__all__ = [
    "INT8_MODEL_FILE",
    "LABELS_FILE",
    "MODEL_FILE",
    "OPENVINO_MODEL_FILE",
    "PREPROCESSOR_FILE",
    "PROB_TOLERANCE",
    "ExportReport",
    "Int8Report",
    "OnnxPredictor",
    "OpenVinoPredictor",
    "Predictor",
    "export_onnx",
    "export_openvino",
    "export_run",
    "open_export",
]
