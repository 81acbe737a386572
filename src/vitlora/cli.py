"""`vitlora` command line: a thin layer over the Python API.

Every user error becomes one line on stderr and exit code 2 (argparse's own usage errors
also exit 2); Ctrl-C during training keeps finished epochs and says how to resume.
Heavy imports (torch, transformers) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import VitloraError


# argparse details the TrainConfig fields cannot say; help texts and defaults come from the fields
_FLAG_EXTRAS: dict[str, dict[str, Any]] = {
    "val": {"metavar": "VAL_DATA"}, "out": {"metavar": "RUN_DIR"}, "negatives": {"metavar": "DIR"},
    "early_stopping": {"metavar": "PATIENCE"}, "mode": {"choices": ["replace", "extend"]},
    "precision": {"choices": ["auto", "fp32", "bf16", "fp16"]},
}


def _field_help(f: Any) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(default, list):
        default = ",".join(default)
    shown = f" (default {default:g})" if isinstance(default, float) else f" (default {default})"
    return f.metadata["help"] + ("" if default is None or default == "" or default is False else shown)


def _train_parser(sub: Any) -> None:
    from .config import TrainConfig, field_kind

    p = sub.add_parser("train", help="fine-tune a model with LoRA on a folder of images",
                       argument_default=argparse.SUPPRESS,
                       description="Fine-tune a pretrained image classifier with LoRA. DATA is an ImageFolder "
                                   "(one sub-folder per class), a flat folder of one class with --label, a CSV/JSONL "
                                   "manifest of path,label, or hf:NAME[:CONFIG]/SPLIT.")
    p.add_argument("data", metavar="DATA")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "data":
            continue
        kind, _ = field_kind(f.name)
        kwargs = {"action": "store_true"} if kind is bool else {"type": str if kind is list else kind}
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=_field_help(f),
                       **kwargs, **_FLAG_EXTRAS.get(f.name, {}))
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of settings; flags override it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitlora", description="Fine-tune vision transformers with LoRA.")
    parser.add_argument("--version", action="version", version=f"vitlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)

    p = sub.add_parser("eval", help="metrics of a run on labelled data")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--label", help="class name when DATA is a flat folder")
    p.add_argument("--negatives", metavar="DIR", help="unlabelled photos of other things: extend mode's false "
                   "positives and retention, replace mode's rejection AUROC")
    p.add_argument("--json", metavar="OUT.json", help="write all metrics as JSON")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("predict", help="top-k labels for images")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("paths", metavar="PATH", nargs="+", help="image files, folders or globs")
    p.add_argument("--top-k", type=int, default=5, dest="top_k")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", metavar="FILE", help="write [{path, top_k: [{label, score}]}]")
    out.add_argument("--csv", metavar="FILE", help="write one row per image")
    p.add_argument("--batch-size", type=int, default=32, dest="batch_size")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--onnx", metavar="EXPORT_DIR",
                   help="predict with an export folder (ONNX, int8 ONNX or OpenVINO) instead of PyTorch")
    p.add_argument("--explain", metavar="DIR",
                   help="also write per image a PNG heat map (Grad-CAM, the photo's size) of where the model "
                        "looked for its top-1 label into DIR; --json rows name it as \"explanation\"")
    p.add_argument("--int8", action="store_true",
                   help="with --onnx: use the folder's int8 model; if EXPORT_DIR does not exist, export RUN_DIR "
                        "there as int8 first (verified on the run's training photos)")

    p = sub.add_parser("merge", help="write a plain transformers model with the adapter merged in")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("info", help="labels, base model, LoRA settings and parameter counts of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = sub.add_parser("serve", help="serve runs over HTTP with a web page")
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on /v1 calls")
    p.add_argument("--max-upload-mb", type=float, default=10.0, dest="max_upload_mb")
    p.add_argument("--max-pixels", type=int, default=40_000_000, dest="max_pixels",
                   help="refuse images with more decoded pixels (413); big JPEGs are decoded at reduced scale first")
    p.add_argument("--max-queue", type=int, default=64, dest="max_queue",
                   help="requests in progress before answering 503 with Retry-After")
    p.add_argument("--max-decodes", type=int, default=2, dest="max_decodes", help="images decoded at once")
    p.add_argument("--read-timeout", type=float, default=60.0, dest="read_timeout_s",
                   help="seconds to receive an upload (408 after)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("export", help="export the merged model (ONNX, int8 ONNX or OpenVINO), verified against PyTorch")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino"])
    p.add_argument("--int8", action="store_true",
                   help="onnx only: write model.int8.onnx (int8 weights), kept only if its top-1 agrees with fp32 "
                        "on >= 99%% of the verification photos")
    p.add_argument("--verify-images", nargs="+", metavar="PATH", dest="verify_images",
                   help="photos to verify the export on (default with --int8: 128 of the run's training photos)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("push", help="upload a run to the Hugging Face hub")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("repo_id", metavar="REPO_ID")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token")
    return parser


# ---- commands ---------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig, parse_targets, read_config_file
    from .training import train_to_dir

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "overwrite", "quiet")}
    values: dict[str, Any] = read_config_file(args.config) if getattr(args, "config", None) else {}
    values.update(given)
    if isinstance(values.get("targets"), str):
        values["targets"] = parse_targets(values["targets"])
    config = TrainConfig.from_dict(values)
    out_hint = config.out
    try:
        train_to_dir(config, overwrite=getattr(args, "overwrite", False), resume=getattr(args, "resume", False),
                     progress=not getattr(args, "quiet", False))
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished epochs are saved; continue with "
              f"vitlora train {config.data} --out {out_hint or config.out or 'RUN_DIR'} --resume", file=sys.stderr)
        return 130
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate
    from .run import load

    run = load(args.run_dir, device=args.device)
    result = evaluate(run, args.data, label=args.label, strict=args.strict)
    if args.negatives:
        from .evaluation import negative_metrics

        result.update(negative_metrics(run, args.data, args.negatives, label=args.label))
    print(format_eval(result))
    if args.json:
        from .rundir import write_json_atomic

        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
        if result.get("reliability"):
            from .plots import plot_reliability

            png = Path(args.json).with_suffix(".reliability.png")
            plot_reliability(result["reliability"], result["ece"], result["n_images"], png)
            print(f"wrote {png} (reliability diagram)")
    return 0


def format_eval(r: dict[str, Any]) -> str:
    lines = [f"images: {r['n_images']} from {r.get('data')}"
             + (f" ({r['skipped']} skipped)" if r.get("skipped") else "")]
    if r.get("n_negatives") is not None:
        lines.append(f"negatives: {r['n_negatives']} from {r['negatives']} (false positives, retention, rejection)")
    for key in ("mean_average_precision", "subset_accuracy", "bce",  # multi-label runs (vitlora.multilabel)
                "accuracy", "top5_accuracy", "macro_precision", "macro_recall", "macro_f1", "nll", "ece",
                "ece_if_calibrated",
                "new_class_recall", "false_positive_rate", "retention", "rejection_auroc", "fpr_at_95_tpr",
                "negatives_rejected", "in_task_rejected"):
        value = r.get(key)
        if isinstance(value, dict):
            value = value.get("mean")
        if value is not None:
            lines.append(f"{key:>20}: {value:.4f}")
    per_class = r.get("per_class", {})
    if per_class:
        width = max(12, *(len(k) for k in per_class))
        lines.append(f"{'label':<{width}}  precision  recall      f1  support")
        for label, m in list(per_class.items())[:30]:
            lines.append(f"{label:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  {m['support']:7d}")
        if len(per_class) > 30:
            lines.append(f"... {len(per_class) - 30} more classes in --json")
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> int:
    from .data import expand_image_paths

    if args.batch_size < 1 or args.top_k < 1:
        raise VitloraError("--batch-size and --top-k must be at least 1")
    paths = expand_image_paths(args.paths)
    skipped: list[tuple[str, str]] = []
    if args.explain and args.onnx:
        raise VitloraError("--explain needs the PyTorch run (RUN_DIR), not --onnx")
    if args.int8 and not args.onnx:
        raise VitloraError("--int8 needs --onnx EXPORT_DIR: the folder holding the int8 model, or where to export it")
    if args.onnx:
        if args.int8 and not Path(args.onnx).exists():
            from .export import export_run

            print(export_run(args.run_dir, args.onnx, int8=True).describe(), file=sys.stderr)
        predictions = _predict_onnx(args.onnx, paths, args.top_k, args.batch_size, skipped, args.int8 or None,
                                    args.run_dir)
    else:
        from .run import predict_files

        predictions = predict_files(args.run_dir, paths, device=args.device, precision=args.precision,
                                    top_k=args.top_k, batch_size=args.batch_size, skipped=skipped)
    rows = [p.to_dict() for p in predictions]
    if args.explain:
        _add_explanations(args, rows)
    if args.json:
        from .rundir import write_json_atomic

        write_json_atomic(args.json, rows)
    elif args.csv:
        _write_csv(args.csv, rows, args.top_k)
    if not (args.json or args.csv) or len(rows) <= 20:
        for row in rows:
            print(shown_path(row["path"]))
            for rank, item in enumerate(row["top_k"], 1):
                print(f"  {rank}. {item['label'][:40]:<40} {100 * item['score']:6.2f}%")
            if "labels" in row:  # multi-label run: every label over its threshold
                print(f"  labels: {', '.join(row['labels']) or '(none)'}")
            if row.get("rejected"):
                print("  rejected: none of the trained classes")
    if args.json or args.csv:
        print(f"wrote {len(rows)} predictions to {shown_path(args.json or args.csv)}")
    if skipped:
        shown = ", ".join(f"{shown_path(p)} ({r})" for p, r in skipped[:3])
        print(f"warning: skipped {len(skipped)} of {len(paths)} files that could not be read: {shown}",
              file=sys.stderr)
    return 0 if rows else 2


def _add_explanations(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Write one overlay per predicted image (explaining the top-1 it reported) and name it in its row."""
    from .explain import explain_files
    from .run import load

    run = load(args.run_dir, device=args.device, precision="fp32")
    overlays = explain_files(run, [row["path"] for row in rows], args.explain,
                             labels={row["path"]: row["top_k"][0]["label"] for row in rows})
    for row in rows:
        row["explanation"] = overlays.get(row["path"])
    print(f"wrote {len(overlays)} explanations to {shown_path(args.explain)}")


def shown_path(path: str) -> str:
    """A file name printable on any terminal: bytes that are not UTF-8 (kept by os.fsdecode) shown as U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def _predict_onnx(export_dir: str, paths: list[str], top_k: int, batch_size: int,
                  skipped: list[tuple[str, str]], int8: bool | None = None, run_dir: str = "") -> list[Any]:
    from .data import Preprocess, normalize, stream_decoded
    from .export import open_export
    from .run import prediction

    predictor = open_export(export_dir, int8=int8)
    pp = Preprocess.from_pretrained(export_dir)
    # the "unknown" answer is recorded in the run's labels.json (the export's lists only the labels)
    labels_file = next((f for f in (Path(run_dir) / "labels.json", Path(export_dir) / "labels.json")
                        if f.is_file()), None)
    labels_info = json.loads(labels_file.read_text()) if labels_file else {}
    out = []
    for batch, batch_paths, report in stream_decoded(paths, pp, batch_size):
        skipped.extend(report.skipped)
        if len(batch_paths):
            for path, tops in zip(batch_paths, predictor.predict_pixels(normalize(batch, pp), top_k)):
                out.append(prediction(labels_info, path, tops))
    return out


def _write_csv(path: str, rows: list[dict[str, Any]], k: int) -> None:
    import io

    from .rundir import write_bytes_atomic

    buf = io.StringIO()
    writer = csv.writer(buf)
    flag = any("rejected" in row for row in rows)  # runs with an "unknown" answer
    header = ["path"] + (["rejected"] if flag else [])
    for i in range(1, k + 1):
        header += [f"label_{i}", f"score_{i}"]
    multi = any("labels" in row for row in rows)  # multi-label run: a last column "a|b" of labels over threshold
    writer.writerow(header + ["labels"] * multi)
    for row in rows:
        cells = [row["path"]] + ([str(bool(row.get("rejected"))).lower()] if flag else [])
        for item in row["top_k"]:
            cells += [item["label"], f"{item['score']:.6f}"]
        if multi:
            cells += [""] * (len(header) - len(cells)) + ["|".join(row.get("labels", []))]
        writer.writerow(cells)
    write_bytes_atomic(path, buf.getvalue().encode("utf-8", "surrogateescape"))  # file names byte for byte


def cmd_merge(args: argparse.Namespace) -> int:
    from .run import load

    run = load(args.run_dir, device="cpu", merge=False)
    out = run.merge(args.out_dir, overwrite=args.overwrite)
    print(f"wrote merged model to {out}: load it with "
          f"pipeline('image-classification', model='{out}')")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .rundir import METRICS, read_run_files

    meta, labels = read_run_files(args.run_dir)
    metrics_path = Path(args.run_dir) / METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    cfg = meta["config"]
    id2label = labels["id2label"]
    info = {
        "run_dir": str(args.run_dir),
        "base_model": meta["base_model"],
        "stacked_on": meta.get("stacked_on"),
        "mode": meta["mode"],
        "num_labels": len(id2label),
        "new_labels": labels.get("new_labels", []),
        "labels": [id2label[str(i)] for i in range(len(id2label))],
        "lora": {"method": cfg.get("method", "lora"), "r": cfg["rank"], "alpha": cfg["alpha"], "dropout": cfg["dropout"],
                 "targets": cfg["targets"], "target_modules": meta["target_modules"], "head": meta["head"]},
        "trainable_params": meta["trainable_params"],
        "total_params": meta["total_params"],
        "trainable_percent": 100 * meta["trainable_params"] / meta["total_params"],
        "best_epoch": metrics.get("best_epoch"),
        "best_val_accuracy": metrics.get("best_val_accuracy"),
        "precision": meta.get("precision"),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    shown = info["labels"] if len(info["labels"]) <= 20 else info["labels"][:5] + ["…"] + info["labels"][-5:]
    print(f"run:        {info['run_dir']}")
    print(f"base model: {info['base_model']}" + (f" (stacked on {info['stacked_on']})" if info["stacked_on"] else ""))
    print(f"mode:       {info['mode']}")
    print(f"labels:     {info['num_labels']} ({', '.join(shown)})")
    if info["new_labels"]:
        print(f"new labels: {', '.join(info['new_labels'])}")
    lo = info["lora"]
    print(f"{lo['method'] + ':':<11} r={lo['r']} alpha={lo['alpha']} dropout={lo['dropout']} on {', '.join(lo['targets'])} "
          f"({', '.join(lo['target_modules'])}); head '{lo['head']}' trained in full")
    print(f"trainable params: {info['trainable_params']:,} || all params: {info['total_params']:,} "
          f"|| trainable%: {info['trainable_percent']:.4f}")
    if info["best_epoch"] is not None:
        acc = info["best_val_accuracy"]
        print(f"best epoch: {info['best_epoch']}" + (f" (val accuracy {acc:.4f})" if acc is not None else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import check_port, create_app, load_adapters, serve

    check_port(args.port)  # before minutes of model loading
    adapters = load_adapters(args.run_dirs, device=args.device)
    app = create_app(adapters, token=args.token, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                     max_queue=args.max_queue, max_decodes=args.max_decodes, read_timeout_s=args.read_timeout_s)
    print(f"serving {len(adapters)} adapter(s) ({', '.join(a.name for a in adapters)}) on "
          f"http://{args.host}:{args.port}/", file=sys.stderr)
    serve(app, host=args.host, port=args.port)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import INT8_MODEL_FILE, MODEL_FILE, OPENVINO_MODEL_FILE, export_run
    from .rundir import check_destination

    kind = OPENVINO_MODEL_FILE if args.format == "openvino" else INT8_MODEL_FILE if args.int8 else MODEL_FILE
    check_destination(args.out_dir, args.run_dir, args.overwrite, kind_file=kind)  # never the run itself
    report = export_run(args.run_dir, args.out_dir, args.format, int8=args.int8, overwrite=args.overwrite,
                        verify_paths=args.verify_images)
    print(report.describe())
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_run

    url = push_run(args.run_dir, args.repo_id, private=args.private, token=args.token)
    print(f"uploaded {args.run_dir} to {url}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "merge": cmd_merge,
            "info": cmd_info, "serve": cmd_serve, "export": cmd_export, "push": cmd_push}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VitloraError as exc:
        print(f"vitlora {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # disk full, permissions, a path under a file: nothing half-written is left (atomic writes)
        where = f": {shown_path(os.fsdecode(exc.filename))}" if exc.filename else ""
        print(f"vitlora {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
