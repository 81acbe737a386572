"""int8 ONNX vs fp32 ONNX on real held-out photos: top-1 agreement, file size, images/s.

Exports the model once in fp32 (`vitlora.export.export_onnx`), then scores several int8
recipes from onnxruntime's quantizer on photos NOT used for calibration or verification:

* ``dynamic``: ``quantize_dynamic`` (QInt8 weights per channel, activations per tensor at run time)
* ``static-<Method>``: ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations
  calibrated on the calibration photos with MinMax / Percentile / Entropy)
* ``weight-only-acc<L>``: ``MatMulNBits`` 8-bit symmetric block-32 weights (`vitlora.export.int8`),
  ``accuracy_level`` 0 (fp32 compute) or 4 (int8 compute); ``weight-only-b16``: blocks of 16
* ``vitlora --int8``: ``export_onnx(..., int8=True)`` as users run it (verified on the calibration photos)

Only weight MatMuls are quantized (the attention's activation x activation MatMuls and the
classifier Gemm stay fp32). images/s: onnxruntime, ``--threads`` intra-op threads, batch
``--batch``, one pass over the held-out photos after one warm-up batch (start-up excluded).

    python benchmarks/int8.py                       # DeiT-tiny, raccoon photos calibrate, 400 held-out
    python benchmarks/int8.py --run /tmp/exp-raccoon --variants dynamic weight-only-acc0
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
VARIANTS = ["dynamic", "static-MinMax", "static-Percentile", "weight-only-acc0", "weight-only-acc4", "weight-only-b16",
            "vitlora"]


def held_out_paths(n: int) -> list[str]:
    """Photos from three shared sets, spread over each (sorted, strided), none of them raccoons."""
    data = SHARED / "data"
    sets = [sorted(glob.glob(str(data / "imagenet-samples/*.JPEG"))),
            sorted(glob.glob(str(data / "pets-negatives/*/*.jpg"))),
            sorted(glob.glob(str(data / "cat-breeds/*/*.*")))]
    shares = [n // 2, n // 4, n - n // 2 - n // 4]
    return [p for paths, k in zip(sets, shares) for p in paths[:: max(1, len(paths) // k)][:k]]


def pixels(paths: list[str], pp) -> np.ndarray:
    from vitlora.data import normalize, stream_decoded

    out = [normalize(b, pp).numpy() for b, names, _ in stream_decoded(paths, pp, 32) if len(names)]
    return np.concatenate(out)


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def score(path: Path, images: np.ndarray, batch: int, threads: int) -> tuple[np.ndarray, float]:
    """(logits, images/s) over ``images``."""
    s = session(path, threads)
    s.run(None, {"pixel_values": images[:batch]})
    started = time.perf_counter()
    logits = np.concatenate([s.run(None, {"pixel_values": images[i : i + batch]})[0]
                             for i in range(0, len(images), batch)])
    return logits, len(images) / (time.perf_counter() - started)


def flip_margins(logits: np.ndarray) -> str:
    """How close to a tie fp32 was on the photos whose top-1 changed."""
    from vitlora.export.common import softmax

    top2 = np.sort(softmax(logits), axis=-1)[:, -2:]
    return ", ".join(f"{m:.3f}" for m in sorted(top2[:, 1] - top2[:, 0])[:8]) or "none"


class Reader:
    """Calibration batches for onnxruntime's static quantizer."""

    def __init__(self, images: np.ndarray) -> None:
        self.batches = iter([{"pixel_values": images[i : i + 16]} for i in range(0, len(images), 16)])

    def get_next(self):
        return next(self.batches, None)


def make_variant(name: str, fp32: Path, work: Path, calib: np.ndarray, model, preprocess) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from vitlora.export import export_onnx
    from vitlora.export.int8 import write_int8

    graph = onnx.load(str(fp32)).graph
    inits = {i.name for i in graph.initializer}
    act_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in inits]
    out = work / f"{name}.onnx"
    if name == "dynamic":
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=act_matmuls)
    elif name.startswith("static-"):
        quantize_static(str(fp32), str(out), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul"], nodes_to_exclude=act_matmuls,
                        calibrate_method=getattr(CalibrationMethod, name.split("-")[1]))
    elif name.startswith("weight-only-acc"):
        write_int8(fp32, out, accuracy_level=int(name.removeprefix("weight-only-acc")))
    elif name == "weight-only-b16":
        write_int8(fp32, out, block_size=16)
    elif name == "vitlora":
        import torch

        report = export_onnx(model, work / "vitlora-int8", preprocess, verify_images=torch.from_numpy(calib),
                             int8=True, overwrite=True)
        print(f"vitlora int8 export: {report.int8}")
        return report.path / "model.int8.onnx"
    return out


def load_model(args: argparse.Namespace):
    """(model, preprocess dict, Preprocess) of a run or a plain model folder."""
    import json

    from vitlora.data import Preprocess

    if args.run:
        from vitlora.run import load

        run = load(args.run, device="cpu", merge=True)
        return run.model, run.settings["processor"], Preprocess.from_pretrained(args.run)
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    preprocess = json.loads((Path(args.model) / "preprocessor_config.json").read_text())
    return model, preprocess, Preprocess.from_pretrained(args.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models/deit-tiny-patch16-224"))
    parser.add_argument("--run", help="a vitlora run folder (instead of --model)")
    parser.add_argument("--calib", default=str(SHARED / "data/raccoon"), help="calibration/verification photos")
    parser.add_argument("--n-calib", type=int, default=128)
    parser.add_argument("--n-heldout", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS + ["static-Entropy"])
    args = parser.parse_args()
    logging.disable(logging.INFO)  # the quantizers log every node

    import torch

    from vitlora.export import export_onnx

    model, preprocess, pp = load_model(args)
    from vitlora.data import expand_image_paths

    calib = pixels(expand_image_paths([args.calib])[: args.n_calib], pp)
    held = pixels(held_out_paths(args.n_heldout), pp)
    print(f"calibration/verification: {len(calib)} photos from {args.calib}; held out: {len(held)} photos "
          f"(imagenet-samples, pets-negatives, cat-breeds); load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = export_onnx(model, work / "fp32", preprocess, verify_images=torch.from_numpy(calib[:4]))
        fp32 = report.path / "model.onnx"
        ref, fp32_speed = score(fp32, held, args.batch, args.threads)
        print(f"| variant | top-1 agreement with fp32 | size / fp32 | img/s (batch {args.batch}, "
              f"{args.threads} threads) | fp32 top-1 - top-2 probability where top-1 changed |\n|---|---|---|---|---|")
        print(f"| fp32 | 100.00 % | 1.000 ({fp32.stat().st_size / 1e6:.1f} MB) | {fp32_speed:.1f} | |")
        for name in args.variants:
            path = make_variant(name, fp32, work, calib, model, preprocess)
            logits, speed = score(path, held, args.batch, args.threads)
            flips = logits.argmax(-1) != ref.argmax(-1)
            print(f"| {name} | {100 * (1 - flips.mean()):.2f} % | {path.stat().st_size / fp32.stat().st_size:.3f} "
                  f"| {speed:.1f} | {flip_margins(ref[flips])} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
