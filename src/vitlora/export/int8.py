"""int8 ONNX models that keep the fp32 model's answers.

Why weight-only: ViT activations carry a few huge outlier channels (after LayerNorm and GELU),
so a per-tensor int8 scale for activations, dynamic or statically calibrated, costs accuracy.
Measured with ``benchmarks/int8.py`` on DeiT-tiny, 400 held-out real photos (ImageNet samples,
pets, cat breeds), calibration on 64 raccoon photos, top-1 agreement with fp32:
``quantize_dynamic`` 94.5 %, ``quantize_static`` QDQ per-channel MinMax 94.0 %, Percentile 95.5 %
(excluding the fc2 MatMuls: 97 % at 0.56 of the size). Quantizing only the MatMul weights,
symmetric int8 in blocks of 32 along the input axis (onnxruntime's ``MatMulNBits``, 8 bits),
keeps activations in fp32: 99.5 % at 0.35 of the fp32 file's size. The classifier (a Gemm)
stays fp32. Agreement at this level moves by about a point with any change of the kernel
(blocks of 16: 98.5 %), so the check below needs enough photos (`vitlora.export.photos`).

The int8 model is only kept if its top-1 agrees with the verified fp32 model on at least
``MIN_AGREEMENT`` of the caller's real photos.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vitlora.errors import VitloraError
from vitlora.export.common import INT8_MODEL_FILE, MODEL_FILE, Int8Report, one_line, require

MIN_AGREEMENT = 0.99
BLOCK_SIZE = 32
METHOD = f"weight-only int8 MatMul (MatMulNBits, symmetric, block {BLOCK_SIZE})"


def write_int8(fp32: Path, int8: Path, block_size: int = BLOCK_SIZE, accuracy_level: int = 0) -> None:
    """Quantize the weight MatMuls of ``fp32`` into ``int8``.

    ``accuracy_level`` is MatMulNBits' compute type: 0 computes in fp32 from the int8 weights;
    4 also quantizes activations to int8 per block (faster, less exact).
    """
    require("onnxruntime")
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, bits=8,
        op_types_to_quantize=("MatMul",),
    )
    logging.disable(logging.INFO)  # the quantizer logs every node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(
            str(fp32), bits=8, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
            algo_config=config, op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(int8), use_external_data_format=False)
    except Exception as e:
        raise VitloraError(f"int8 quantization failed: {one_line(e)}") from e
    finally:
        logging.disable(logging.NOTSET)


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def batched_logits(predictor, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Logits of ``images`` in batches (keeps memory flat for a few hundred 224 px images)."""
    return np.concatenate([predictor.logits(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def quantize_int8(folder: Path, images: np.ndarray, min_agreement: float = MIN_AGREEMENT) -> Int8Report:
    """Replace ``folder``'s verified ``model.onnx`` by ``model.int8.onnx`` if it agrees enough.

    ``images`` are real preprocessed photos (the verification images). On refusal the folder
    still holds the fp32 model; the caller's staging discards it.
    """
    from vitlora.export.predictor import OnnxPredictor

    fp32, int8 = folder / MODEL_FILE, folder / INT8_MODEL_FILE
    write_int8(fp32, int8)
    reference = batched_logits(OnnxPredictor(folder, int8=False), images)
    agreement = top1_agreement(batched_logits(OnnxPredictor(folder, int8=True), images), reference)
    if agreement < min_agreement:
        raise VitloraError(
            f"the int8 model agrees with fp32 on only {100 * agreement:.1f} % of {len(images)} photos "
            f"(needs {100 * min_agreement:.0f} %); int8 export discarded"
        )
    report = Int8Report(
        size_ratio=int8.stat().st_size / fp32.stat().st_size,
        top1_agreement=agreement,
        n_images=len(images),
        method=METHOD,
    )
    fp32.unlink()
    return report
