"""Predict end to end, three ways side by side on the same JPEGs: the lab's loop, `vitlora predict RUN`
(PyTorch) and `vitlora predict --onnx EXPORT` (onnxruntime, fp32), and with `--int8` the int8 export.

Setup (not timed): a 1-epoch reference lab adapter (`reference_lab.py --mode train`) and a 1-epoch vitlora
run on the raccoon photos, then `vitlora export RUN EXPORT` (+ `--int8`). Timed: each predict command
from process start to its JSON written, over `--n` JPEGs made like `bench.py` makes them, `--repeats`
rounds interleaved; the table has medians and ratios to the lab's loop, and the share of photos whose
top-1 under ONNX equals the PyTorch run's.

    python benchmarks/predict_paths.py --repeats 3 [--int8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (run_measured, make_predict_dir, find_vitlora)
from _cpu import cpu_line  # noqa: E402


def top1(path: str) -> dict[str, str]:
    with open(path) as fh:
        rows = json.load(fh)
    return {os.path.basename(r["path"]): r["top_k"][0]["label"] for r in rows}


def main(argv: list[str] | None = None) -> int:
    shared = os.path.join(os.path.dirname(HERE), "..", "shared")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(shared, "models", "deit-tiny-patch16-224"))
    ap.add_argument("--data", default=os.path.join(shared, "data", "raccoon"))
    ap.add_argument("--n", type=int, default=300, help="JPEGs to predict (copies cycling through --data)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--int8", action="store_true", help="also the int8 export (predict --onnx DIR --int8)")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    work = a.workdir or tempfile.mkdtemp(prefix="vitlora-predict-")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    vit = bench.find_vitlora()
    paths = bench.make_predict_dir(a.data, os.path.join(work, "photos"), a.n)
    ref_dir, run, export = (os.path.join(work, x) for x in ("reference", "run", "export"))
    setup = [
        [sys.executable, os.path.join(HERE, "reference_lab.py"), "--mode", "train", "--model", a.model,
         "--data", a.data, "--out", ref_dir, "--epochs", "1", "--val-split", "0.2", "--seed", "0"],
        vit + ["train", a.data, "--label", "raccoon", "--model", a.model, "--out", run, "--epochs", "1", "--quiet"],
        vit + ["export", run, export] + (["--int8"] if a.int8 else []),
    ]
    for i, cmd in enumerate(setup):
        r = bench.run_measured(cmd, os.path.join(work, f"setup-{i}.log"), env=env)
        if r["rc"]:
            raise SystemExit(f"setup step failed (exit {r['rc']}): see {r['log']}")
    if a.int8:  # the int8 export sits beside a fp32 one: export that too, so both ONNX rows run
        fp32 = os.path.join(work, "export-fp32")
        bench.run_measured(vit + ["export", run, fp32], os.path.join(work, "setup-fp32.log"), env=env)
    else:
        fp32 = export
    ways = {
        "reference lab loop (one image at a time)": [sys.executable, os.path.join(HERE, "reference_lab.py"),
                                                     "--mode", "predict", "--adapter", os.path.join(ref_dir, "adapter"),
                                                     "--predict-dir", os.path.join(work, "photos"), "--top-k", "5"],
        "vitlora predict RUN (PyTorch fp32)": vit + ["predict", run] + paths + ["--top-k", "5"],
        "vitlora predict --onnx EXPORT (onnxruntime fp32)": vit + ["predict", run] + paths + ["--top-k", "5",
                                                                                             "--onnx", fp32],
    }
    if a.int8:
        ways["vitlora predict --onnx EXPORT --int8"] = vit + ["predict", run] + paths + ["--top-k", "5", "--onnx",
                                                                                      export, "--int8"]
    walls: dict[str, list[float]] = {k: [] for k in ways}
    outs: dict[str, str] = {}
    for rep in range(a.repeats):
        for i, (name, cmd) in enumerate(ways.items()):
            out = os.path.join(work, f"pred-{i}-{rep}.json")
            r = bench.run_measured(cmd + ["--json", out], os.path.join(work, f"pred-{i}-{rep}.log"), env=env)
            if r["rc"]:
                raise SystemExit(f"{name} failed (exit {r['rc']}): see {r['log']}")
            walls[name].append(r["outer_wall_s"])
            outs[name] = out
            print(f"[{rep}] {name}: {r['outer_wall_s']:.2f} s", flush=True)
    names = list(ways)
    ref = statistics.median(walls[names[0]])
    torch_top1 = top1(outs[names[1]])
    lines = [f"Predict end to end over {a.n} JPEGs, median of {a.repeats} interleaved rounds; "
             f"{cpu_line()}; Python {platform.python_version()}.", "",
             "| pipeline | wall s (median) | images/s | × the lab's loop | top-1 = PyTorch run's |",
             "|---|---|---|---|---|"]
    for name in names:
        w = statistics.median(walls[name])
        agree = ""
        if name != names[0]:
            other = top1(outs[name])
            agree = f"{sum(other[k] == v for k, v in torch_top1.items()) / len(torch_top1):.4f}"
        lines.append(f"| {name} | {w:.2f} | {a.n / w:.1f} | ×{ref / w:.2f} | {agree} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
