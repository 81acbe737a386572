"""`export_run`: what `vitlora export RUN OUT` does, so the CLI only parses flags and prints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vitlora.errors import VitloraError
from vitlora.export.common import OPENVINO_MODEL_FILE, ExportReport
from vitlora.export.predictor import OnnxPredictor, Predictor

FORMATS = ("onnx", "openvino")


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    format: str = "onnx",
    *,
    int8: bool = False,
    overwrite: bool = False,
    verify_paths: Sequence[str] | None = None,
) -> ExportReport:
    """Load ``run_dir`` merged on the CPU and export it, verified on real photos.

    The photos are ``verify_paths`` (files, folders or globs) if given; else, for ``int8``, the
    run's own training photos (`run_photos`); else the exporters' seeded random batch.
    """
    from vitlora.data import expand_image_paths
    from vitlora.export.onnx_export import export_onnx
    from vitlora.export.photos import photos, run_photos
    from vitlora.run import load

    if format not in FORMATS:
        raise VitloraError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if int8 and format != "onnx":
        raise VitloraError("int8 is only offered for the onnx format")
    run = load(run_dir, device="cpu", merge=True)
    images = None
    if verify_paths:
        images = photos(expand_image_paths(list(verify_paths)), run.preprocess)
    elif int8:
        images = run_photos(run.settings, run.preprocess)
    preprocess = run.settings["processor"]
    if format == "openvino":
        from vitlora.export.openvino_export import export_openvino

        return export_openvino(run.model, out_dir, preprocess, verify_images=images, overwrite=overwrite)
    return export_onnx(run.model, out_dir, preprocess, verify_images=images, overwrite=overwrite, int8=int8)


def open_export(folder: str | Path, int8: bool | None = None) -> Predictor:
    """The predictor for whatever ``folder`` holds: OpenVINO IR, else ONNX (``int8`` as in
    `OnnxPredictor`), so ``predict --onnx DIR`` runs every export format."""
    if (Path(folder) / OPENVINO_MODEL_FILE).is_file():
        if int8:
            raise VitloraError(f"{folder} is an OpenVINO export; int8 is only offered for ONNX exports")
        from vitlora.export.openvino_export import OpenVinoPredictor

        return OpenVinoPredictor(folder)
    return OnnxPredictor(folder, int8=int8)
