#!/usr/bin/env python
"""Side-by-side benchmark: vitlora vs the reference pipelines, as subprocesses, on the same data.

Suites (``--suite``):

* ``lab`` (default) - add a class to DeiT-tiny's 1000 ImageNet classes with the raccoon photos:
  ``benchmarks/reference_lab.py`` (the Cognitive Class DeiT-tiny LoRA lab: r=4, alpha=8,
  dropout 0.2, batch 2 x accumulation 4, lr 6e-4, fp32 Trainer, pre-processed ``Dataset``,
  one-image-at-a-time inference) vs
  ``vitlora train DATA --model M --out RUN --mode extend --label raccoon --rank 4 --alpha 8
  --dropout 0.2 --epochs N --val-split F --seed S --overwrite``.
* ``guide`` - new head on a two-class ImageFolder (``make_guide_data.py``: the raccoon photos +
  150 seeded crops of scikit-image sample photos): ``benchmarks/reference_guide.py`` (the PEFT
  image-classification LoRA guide: r=16, alpha=16, dropout 0.1, batch 128 x accumulation 4,
  lr 5e-3, fp32 on CPU) vs ``vitlora train GUIDE_DATA ... --mode replace --rank 16 --alpha 16
  --dropout 0.1 ...``.
* ``both``.

The work is matched: same model path, same data, same ``--val-split`` / ``--seed`` (the
reference scripts hold out exactly the files vitlora's seeded split holds out), same epochs
(``--epochs``, default 10, for the lab suite; ``--guide-epochs``, default 5 as in the guide).
Prediction runs over ``--predict-n`` (default 300) JPEGs made by copying the 150 raccoon photos
into a temp folder as distinct files (``img-0000-raccoon-1.jpg`` ...), with each pipeline's
freshly trained adapter: ``reference_*.py --mode predict`` (one image at a time, the
references' own loop) vs ``vitlora predict RUN_DIR PATHS... --top-k 5 --json OUT.json``.

Each pipeline runs ``--repeats`` times (default 3); repeats are interleaved (reference,
vitlora, then vitlora, reference, ...) so background load hits both alike, and the table shows
the median of each figure:

* train images/s - reference: train images x epochs / seconds inside ``trainer.train()`` (from
  its JSON line); vitlora: mean of the per-epoch ``images_per_s`` in ``RUN_DIR/metrics.json``;
* train wall s - process start -> saved run. reference: its own ``wall_s`` (read from
  ``/proc/self/stat`` start time to adapter saved; the lab's post-training evaluation loop
  after the save is excluded); vitlora: measured here around the subprocess (spawn -> exit);
* predict images/s - end to end: ``--predict-n`` / (spawn -> exit, predictions JSON written),
  measured here for both;
* peak RSS MB - ``ru_maxrss`` of the subprocess tree from ``os.wait4``, max of train and
  predict (both are also in the JSON);
* final accuracy - reference: its ``val_accuracy``; vitlora: ``val_accuracy`` of the last
  epoch in metrics.json (best epoch's too, in the JSON);
* ratio row - vitlora / reference for throughput, RSS and accuracy; for wall time the
  speed-up, reference / vitlora ("2.00× faster" = half the wall time);
* ceiling rows (CPU lab suite; ``--no-ceiling`` skips them) - ``ceiling.py`` once per repeat:
  the bare model's fp32 inference forward and its bare LoRA step (fp32 and bf16 autocast) at
  batch 32 with no pipeline around it, as images/s and as a multiple of the reference's
  training rate: what any trainer could reach on this machine.

The raw numbers (every run, the command lines, CPU seconds, load average before/after each
run, logs' paths) and the markdown table go to ``--out`` (JSON). Run logs are kept under
``--workdir`` (default a new ``/tmp/vitlora-bench-*`` folder, removed unless ``--keep``; the
run directories with the adapters are large-ish only for the reference checkpoints).

vitlora missing or failing (its CLI is young): the vitlora rows read "not available" and the
reference numbers are still reported; ``--only reference`` skips it entirely.

``--quick``: 1 repeat, 2 epochs (both suites), 60 predict images - a smoke run.

``--save`` also writes the table and the raw JSON to
``benchmarks/results/{cpu|gpu}-{lab|guide|both}-<date>.md`` and ``.json`` (next to this script).

``--gpu``: the GPU comparison the PEFT guide was written for - the ``guide`` suite on a CUDA
device with a ViT-base/16 checkpoint (``--model`` must be a local ViT-base folder, e.g. a
download of ``google/vit-base-patch16-224-in21k``; nothing is fetched): ``reference_guide.py
--device cuda`` (the guide's fp16, batch 128 x accumulation 4, lr 5e-3) vs ``vitlora train ...
--mode replace --rank 16 --alpha 16 --dropout 0.1 --device cuda --batch-size 128`` (precision
``auto``: bf16 where the GPU has it, else fp16). ``--guide-data`` can point at a larger
ImageFolder (the guide used Food-101); peak RSS is host memory only (GPU memory is not
measured). Written for machines with a GPU; results from it are only as good as the run that
produced them.

Train images/s of a reference is its Trainer's training steps only: train images x epochs /
(seconds inside ``trainer.train()`` minus the ``eval_runtime`` of its per-epoch evaluations),
so the references' evaluation does not count against them (the raw Trainer figure, eval
included, is kept as ``train_images_per_s_incl_eval`` in the JSON). vitlora's per-epoch
figure excludes its validation pass too.

No network: everything is local; the subprocesses get ``HF_HUB_OFFLINE=1`` and
``HF_DATASETS_OFFLINE=1``.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = "/work/shared/models/deit-tiny-patch16-224"
DEFAULT_DATA = "/work/shared/data/raccoon"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# --------------------------------------------------------------------------------------------
# subprocess plumbing
# --------------------------------------------------------------------------------------------


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def run_measured(cmd, log_path, env=None, timeout=None, cwd=None) -> dict:
    """Run ``cmd``; wall time around it, rusage (incl. descendants) from ``os.wait4``."""
    load_before = loadavg()
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        timed_out = {"v": False}

        def _kill():
            timed_out["v"] = True
            try:
                os.killpg(proc.pid, 9)  # our own child's process group
            except OSError:
                pass

        timer = threading.Timer(timeout, _kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            if timer:
                timer.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "cmd": cmd,
        "rc": proc.returncode,
        "timed_out": timed_out["v"],
        "outer_wall_s": wall,
        "maxrss_mb": ru.ru_maxrss / 1024.0,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "log": log_path,
    }


def last_json_line(path):
    try:
        with open(path, "rb") as fh:
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def tail(path, n=15):
    try:
        with open(path, "rb") as fh:
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # progress bars use \r; keep the last state of each line
    lines = [ln.rsplit("\r", 1)[-1] for ln in data.splitlines()]
    return "\n".join(lines[-n:])


def cpu_probes() -> str | None:
    """torch's bf16 / AMX probes: what `--precision auto` decides on, so every result says what it ran on."""
    try:
        import torch

        bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
        amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        return f"avx512_bf16={bf16}, amx={amx}, capability {torch.backends.cpu.get_cpu_capability()}"
    except Exception:  # noqa: BLE001 - a benchmark without torch still reports the rest
        return None


def find_vitlora():
    """Command prefix for the vitlora CLI, or None when it is not installed/usable."""
    cand = os.path.join(os.path.dirname(sys.executable), "vitlora")
    prefixes = []
    if os.path.exists(cand):
        prefixes.append([cand])
    w = shutil.which("vitlora")
    if w and [w] not in prefixes:
        prefixes.append([w])
    prefixes.append([sys.executable, "-c", "import sys; from vitlora.cli import main; sys.exit(main())"])
    for pre in prefixes:
        try:
            r = subprocess.run(pre + ["train", "--help"], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and "--mode" in r.stdout:
            return pre
    return None


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def list_images(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))


def make_predict_dir(src, dst, n):
    """``n`` distinct JPEG files made by cycling through the photos in ``src``."""
    os.makedirs(dst, exist_ok=True)
    photos = list_images(src)
    if not photos:
        raise SystemExit(f"no images in {src}")
    paths = []
    for i in range(n):
        name = photos[i % len(photos)]
        out = os.path.join(dst, f"img-{i:04d}-{name}")
        shutil.copyfile(os.path.join(src, name), out)
        paths.append(out)
    return paths


# --------------------------------------------------------------------------------------------
# pipelines
# --------------------------------------------------------------------------------------------


class Pipeline:
    """One side of a comparison: how to train, predict and read the numbers back."""

    def __init__(self, name, kind, suite):
        self.name, self.kind, self.suite = name, kind, suite  # kind: reference | vitlora


def reference_train_cmd(script, a, data, out, epochs, extra):
    cmd = [sys.executable, os.path.join(HERE, script), "--mode", "train", "--model", a.model,
           "--data", data, "--out", out, "--epochs", str(epochs), "--val-split", str(a.val_split),
           "--seed", str(a.seed)]
    if a.gpu:
        cmd += ["--device", "cuda"]
    return cmd + extra


def vitlora_train_cmd(prefix, a, data, out, epochs, suite):
    cmd = prefix + ["train", data, "--model", a.model, "--out", out]
    if suite == "lab":
        cmd += ["--mode", "extend", "--label", a.label, "--rank", "4", "--alpha", "8", "--dropout", "0.2"]
    else:
        cmd += ["--mode", "replace", "--rank", "16", "--alpha", "16", "--dropout", "0.1"]
    cmd += ["--epochs", str(epochs), "--val-split", str(a.val_split), "--seed", str(a.seed), "--overwrite"]
    if a.gpu:
        cmd += ["--device", "cuda", "--batch-size", "128"]
    return cmd + shlex.split(a.vitlora_args)


def one_run(p, a, ctx, rep):
    """Train then predict once; returns the raw record (never raises for pipeline failures)."""
    suite = p.suite
    epochs = a.epochs if suite == "lab" else a.guide_epochs
    data = a.data if suite == "lab" else ctx["guide_data"]
    tag = f"{suite}-{p.kind}-r{rep}"
    run_dir = os.path.join(ctx["workdir"], "runs", tag)
    logs = ctx["logs"]
    rec = {"pipeline": p.name, "suite": suite, "kind": p.kind, "repeat": rep, "epochs": epochs,
           "data": data, "run_dir": run_dir, "ok": False}
    env = ctx["env"]

    # ---- train ----
    if p.kind == "reference":
        script = "reference_lab.py" if suite == "lab" else "reference_guide.py"
        extra = ["--label", a.label] if suite == "lab" else []
        cmd = reference_train_cmd(script, a, data, run_dir, epochs, extra + shlex.split(a.reference_args))
    else:
        cmd = vitlora_train_cmd(ctx["vitlora"], a, data, run_dir, epochs, suite)
    print(f"[{tag}] train: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    tr = run_measured(cmd, os.path.join(logs, f"{tag}-train.log"), env=env, timeout=a.timeout)
    rec["train_proc"] = tr
    if tr["rc"] != 0:
        rec["error"] = f"train exited {tr['rc']}" + (" (timeout)" if tr["timed_out"] else "")
        rec["log_tail"] = tail(tr["log"])
        print(f"[{tag}] FAILED: {rec['error']}\n{rec['log_tail']}", flush=True)
        return rec
    if p.kind == "reference":
        res = last_json_line(tr["log"])
        if not res:
            rec["error"] = "no JSON result line in the train log"
            return rec
        rec["train_result"] = res
        rec["train_images_per_s"] = res.get("train_images_per_s")
        rec["train_images_per_s_incl_eval"] = res.get("train_images_per_s")
        eval_s = sum(h.get("eval_runtime", 0.0) for h in res.get("log_history") or [] if isinstance(h, dict))
        n_train, wall = res.get("n_train"), res.get("train_wall_s")
        if isinstance(res.get("train_images_per_s_excl_eval"), (int, float)):
            # computed by the script right after trainer.train(), so the guide's final
            # trainer.evaluate() (also in log_history) is not subtracted
            rec["train_images_per_s"] = res["train_images_per_s_excl_eval"]
        elif n_train and wall and 0 < eval_s < wall:
            rec["train_images_per_s"] = n_train * res.get("epochs", epochs) / (wall - eval_s)
            rec["train_eval_s"] = eval_s
        rec["train_wall_s"] = res.get("wall_s")
        rec["final_accuracy"] = res.get("val_accuracy")
        adapter = res.get("adapter_dir") or os.path.join(run_dir, "adapter")
    else:
        mpath = os.path.join(run_dir, "metrics.json")
        try:
            with open(mpath) as fh:
                metrics = json.load(fh)
        except (OSError, ValueError) as e:
            rec["error"] = f"cannot read {mpath}: {e}"
            return rec
        epochs_m = metrics.get("epochs") or []
        rec["metrics_json"] = metrics
        ips = [e.get("images_per_s") for e in epochs_m if isinstance(e.get("images_per_s"), (int, float))]
        rec["train_images_per_s"] = statistics.fmean(ips) if ips else None
        rec["train_wall_s"] = tr["outer_wall_s"]
        rec["final_accuracy"] = epochs_m[-1].get("val_accuracy") if epochs_m else None
        best = metrics.get("best_epoch")
        for e in epochs_m:
            if best is not None and e.get("epoch") == best:
                rec["best_accuracy"] = e.get("val_accuracy")
        adapter = run_dir

    # ---- predict ----
    pred_json = os.path.join(ctx["workdir"], "preds", f"{tag}.json")
    if p.kind == "reference":
        script = "reference_lab.py" if suite == "lab" else "reference_guide.py"
        cmd = [sys.executable, os.path.join(HERE, script), "--mode", "predict", "--adapter", adapter,
               "--predict-dir", ctx["predict_dir"], "--json", pred_json, "--top-k", "5"]
        if a.gpu and script == "reference_guide.py":
            cmd += ["--device", "cuda"]
    else:
        cmd = ctx["vitlora"] + ["predict", run_dir] + ctx["predict_paths"] + ["--top-k", "5", "--json", pred_json]
        if a.gpu:
            cmd += ["--device", "cuda"]
    print(f"[{tag}] predict {len(ctx['predict_paths'])} images", flush=True)
    pr = run_measured(cmd, os.path.join(logs, f"{tag}-predict.log"), env=env, timeout=a.timeout)
    rec["predict_proc"] = {k: (v if k != "cmd" else v[:8] + ["..."]) for k, v in pr.items()}
    if pr["rc"] != 0:
        rec["error"] = f"predict exited {pr['rc']}" + (" (timeout)" if pr["timed_out"] else "")
        rec["log_tail"] = tail(pr["log"])
        print(f"[{tag}] predict FAILED: {rec['error']}\n{rec['log_tail']}", flush=True)
        return rec
    n_pred = len(ctx["predict_paths"])
    try:
        with open(pred_json) as fh:
            n_written = len(json.load(fh))
    except (OSError, ValueError):
        n_written = None
    rec["predict_written"] = n_written
    if n_written != n_pred:
        rec["error"] = f"predictions JSON has {n_written} entries, expected {n_pred}"
        return rec
    rec["predict_images_per_s"] = n_pred / pr["outer_wall_s"]
    rec["predict_wall_s"] = pr["outer_wall_s"]
    if p.kind == "reference":
        rec["predict_result"] = last_json_line(pr["log"])
    rec["peak_rss_mb"] = max(tr["maxrss_mb"], pr["maxrss_mb"])
    rec["ok"] = True
    print(
        f"[{tag}] train {fmt(rec['train_images_per_s'])} img/s, wall {fmt(rec['train_wall_s'])} s, "
        f"predict {fmt(rec['predict_images_per_s'])} img/s, RSS {fmt(rec['peak_rss_mb'], 0)} MB, "
        f"acc {fmt(rec['final_accuracy'], 3)}",
        flush=True,
    )
    return rec


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------

def ceiling_run(a, ctx, rep):
    """``ceiling.py`` once (CPU only): the model's bare fp32 forward and LoRA step, same machine, same run."""
    log = os.path.join(ctx["logs"], f"ceiling-r{rep}.log")
    print(f"[ceiling-r{rep}] bare forward / LoRA step of {os.path.basename(a.model)}", flush=True)
    proc = run_measured([sys.executable, os.path.join(HERE, "ceiling.py"), "--model", a.model], log,
                        env=ctx["env"], timeout=a.timeout)
    out = last_json_line(log) or {}
    if proc.get("rc") != 0 or not out:
        print(f"[ceiling-r{rep}] failed:\n{tail(log)}", flush=True)
        return None
    return out


def ceiling_lines(ceilings, summary, predict_n=300):
    """Markdown lines: the hardware ceiling as images/s and as a multiple of the lab reference's training rate."""
    if not ceilings:
        return ""
    ref = next((s for s in summary.values() if s["suite"] == "lab" and s["kind"] == "reference" and s["ok_runs"]), None)
    ref_rate = ref["train_images_per_s"] if ref else None
    lines = ["", "", "| same machine, same run: bare model compute (`ceiling.py`, batch 32, no pipeline) | images/s "
                 "| × reference lab train images/s |", "|---|---|---|"]
    for key, what in (("forward_fp32_images_per_s", "inference forward, fp32 (no backward at all)"),
                      ("step_fp32_images_per_s", "LoRA training step (forward + backward), fp32"),
                      ("step_bf16_images_per_s", "LoRA training step, bf16 autocast")):
        v = statistics.median([c[key] for c in ceilings])
        lines.append(f"| {what} | {v:.2f} | " + (f"×{v / ref_rate:.2f}" if ref_rate else "-") + " |")
    if all("startup_s" in c for c in ceilings):
        start = statistics.median([c["startup_s"] for c in ceilings])
        fwd = statistics.median([c["forward_fp32_images_per_s"] for c in ceilings])
        n = max(1, int(predict_n))
        floor = n / (start + n / fwd)
        ref_pred = ref["predict_images_per_s"] if ref else None
        lines.append(f"| predict floor, {n} images: start-up {start:.1f} s (import torch + transformers + PEFT, "
                     f"load) + {n} images at the forward rate (decoding not counted) | {floor:.2f} | "
                     + (f"×{floor / ref_pred:.2f} of reference predict images/s" if ref_pred else "-") + " |")
    mine = next((s for s in summary.values() if s["suite"] == "lab" and s["kind"] == "vitlora" and s["ok_runs"]), None)
    if mine is not None:  # issue 12's bar: vitlora's training rate against the bare dense step (all 224-px tokens)
        for key, what in (("step_fp32_images_per_s", "fp32"), ("step_bf16_images_per_s", "bf16")):
            v = statistics.median([c[key] for c in ceilings])
            lines.append(f"| vitlora train images/s ÷ the bare dense LoRA step, {what} | "
                         f"{mine['train_images_per_s']:.2f} | ×{mine['train_images_per_s'] / v:.2f} of the step |")
    c0 = ceilings[0]
    lines.append(f"| CPU bf16 matrix units (AMX / AVX-512-BF16) | {c0.get('amx')} / {c0.get('avx512_bf16')} | |")
    return "\n".join(lines)


COLUMNS = [
    ("train_images_per_s", "train images/s", 2),
    ("train_wall_s", "train wall s", 1),
    ("predict_images_per_s", "predict images/s", 2),
    ("peak_rss_mb", "peak RSS MB", 0),
    ("final_accuracy", "final accuracy", 3),
]


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{nd}f}"


def median_of(records, key):
    vals = [r[key] for r in records if r.get("ok") and isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def summarise(pipelines, records):
    summary = {}
    for p in pipelines:
        recs = [r for r in records if r["pipeline"] == p.name]
        ok = [r for r in recs if r.get("ok")]
        s = {"runs": len(recs), "ok_runs": len(ok), "suite": p.suite, "kind": p.kind}
        for key, _, _ in COLUMNS:
            s[key] = median_of(recs, key)
        s["train_cpu_s"] = statistics.median([r["train_proc"]["cpu_s"] for r in ok]) if ok else None
        if not ok:
            errs = [r.get("error") for r in recs if r.get("error")]
            s["error"] = errs[0] if errs else "not run"
        summary[p.name] = s
    return summary


def markdown_table(pipelines, summary, a):
    head = "| pipeline | " + " | ".join(c[1] for c in COLUMNS) + " | runs |"
    sep = "|" + "---|" * (len(COLUMNS) + 2)
    lines = [head, sep]
    for suite in ("lab", "guide"):
        ps = [p for p in pipelines if p.suite == suite]
        if not ps:
            continue
        ref = next((p for p in ps if p.kind == "reference"), None)
        for p in ps:
            s = summary[p.name]
            if s["ok_runs"] == 0:
                what = "not available" if s.get("error") in (None, "not available", "not run") else "failed (see JSON)"
                cells = [what] + ["-"] * (len(COLUMNS) - 1)
            else:
                cells = [fmt(s[k], nd) for k, _, nd in COLUMNS]
            lines.append(f"| {p.name} | " + " | ".join(cells) + f" | {s['ok_runs']}/{s['runs']} |")
            if p.kind == "vitlora" and ref is not None and s["ok_runs"] and summary[ref.name]["ok_runs"]:
                rs = summary[ref.name]
                cells = []
                for k, _, _ in COLUMNS:
                    v, r = s.get(k), rs.get(k)
                    if v is None or not r or not v:
                        cells.append("-")
                    elif k == "train_wall_s":  # a speed-up: reference wall / vitlora wall
                        cells.append(f"{r / v:.2f}× faster" if r >= v else f"{v / r:.2f}× slower")
                    else:
                        cells.append(f"×{v / r:.2f}")
                lines.append(f"| ratio {p.name} / {ref.name} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def save_results(result, a, records, stem=None):
    """benchmarks/results/{cpu|gpu}-{suite}-<date>.md (table, settings, every run) and the JSON beside it."""
    if stem is None:
        folder = os.path.join(HERE, "results")
        os.makedirs(folder, exist_ok=True)
        stem = os.path.join(folder, f"{'gpu' if a.gpu else 'cpu'}-{a.suite}-{datetime.date.today().isoformat()}")
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    env = result["environment"]
    lines = [
        f"# vitlora vs reference LoRA pipelines ({'GPU' if a.gpu else 'CPU'}), {result['created']}",
        "",
        f"`python benchmarks/bench.py {' '.join(shlex.quote(x) for x in (a.argv or []))}`".replace("  ", " "),
        "",
        f"Median of {a.repeats} interleaved repeat(s); lab suite {a.epochs} epochs, guide suite {a.guide_epochs} "
        f"epochs; predict over {a.predict_n} JPEGs; val split {a.val_split}, seed {a.seed}; model `{a.model}`.",
        f"Machine: {env.get('cpu')}, {env.get('nproc')} CPUs ({env.get('cpu_probes') or 'bf16/AMX probes not recorded'}), "
        f"torch {(env.get('torch') or {}).get('version')}"
        + (f", GPU {(env.get('torch') or {}).get('gpu')}" if a.gpu else "") + ".",
        "",
        result["table_markdown"],
        "",
        "Columns: train images/s through the training steps (data pipeline included, evaluation excluded on both "
        "sides); train wall s from process start to saved run; predict images/s end to end (process start to "
        "predictions JSON written); peak RSS of train and predict processes; final accuracy on the held-out split.",
        "",
        "## Every run",
        "",
        "| run | train images/s | train wall s | predict images/s | peak RSS MB | final accuracy | train CPU s "
        "| load avg (1 min) before -> after train |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        tp = r.get("train_proc") or {}
        lb, la = (tp.get("loadavg_before") or [None])[0], (tp.get("loadavg_after") or [None])[0]
        lines.append(
            f"| {r['pipeline']} #{r['repeat']} | {fmt(r.get('train_images_per_s'))} | {fmt(r.get('train_wall_s'), 1)} "
            f"| {fmt(r.get('predict_images_per_s'))} | {fmt(r.get('peak_rss_mb'), 0)} "
            f"| {fmt(r.get('final_accuracy'), 3)} | {fmt(tp.get('cpu_s'), 0)} | {fmt(lb, 1)} -> {fmt(la, 1)} |"
            + ("" if r.get("ok") else f" {r.get('error', '')}")
        )
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return stem + ".md", stem + ".json"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def render(a) -> int:
    """Rebuild the tables of a saved run from its raw records (after a change to the table format)."""
    with open(a.render) as fh:
        result = json.load(fh)
    saved = argparse.Namespace(**result["config"])
    pipelines = [Pipeline(name, s["kind"], s["suite"]) for name, s in result["summary"].items()]
    result["summary"] = summarise(pipelines, result["runs"])
    result["table_markdown"] = (markdown_table(pipelines, result["summary"], saved)
                                + ceiling_lines(result.get("ceiling") or [], result["summary"], saved.predict_n))
    print(result["table_markdown"])
    if a.save:
        with open(a.render, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        # the .md beside a results JSON is named after the JSON
        saved.argv = result["config"].get("argv") or []
        md = save_results(result, saved, result["runs"], stem=os.path.splitext(os.path.abspath(a.render))[0])
        print(f"saved: {md[0]}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Benchmark vitlora against the reference LoRA pipelines (see module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--model", default=DEFAULT_MODEL, help="base model dir (all pipelines)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="photos of the new class (lab suite)")
    ap.add_argument("--label", default="raccoon")
    ap.add_argument("--suite", choices=["lab", "guide", "both"], default="lab")
    ap.add_argument("--only", choices=["all", "reference", "vitlora"], default="all")
    ap.add_argument("--epochs", type=int, default=10, help="lab suite epochs (both pipelines)")
    ap.add_argument("--guide-epochs", type=int, default=5, help="guide suite epochs (both pipelines)")
    ap.add_argument("--guide-data", default=None,
                    help="ImageFolder for the guide suite (default: built by make_guide_data.py in the workdir)")
    ap.add_argument("--val-split", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--predict-n", type=int, default=300, help="JPEGs for the predict timing")
    ap.add_argument("--quick", action="store_true", help="1 repeat, 2 epochs, 60 predict images")
    ap.add_argument("--out", default="/tmp/vitlora-bench-results.json", help="JSON file for the table + raw numbers")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a new /tmp/vitlora-bench-*)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (runs, logs, predictions)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per subprocess (default: none)")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP/MKL threads for every subprocess (0: leave the environment alone)")
    ap.add_argument("--vitlora-args", default="", help="extra args appended to 'vitlora train' (quoted)")
    ap.add_argument("--reference-args", default="", help="extra args appended to the reference train scripts")
    ap.add_argument("--gpu", action="store_true",
                    help="GPU comparison: guide suite on CUDA, --model a local ViT-base/16 folder (see module doc)")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="re-print (and with --save re-write) the tables of a saved results JSON; runs nothing")
    ap.add_argument("--no-ceiling", action="store_true", help="skip ceiling.py (the bare model compute)")
    ap.add_argument("--save", action="store_true",
                    help="also write benchmarks/results/{cpu|gpu}-{suite}-<date>.md and .json")
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.render:
        return render(a)
    if a.quick:
        a.repeats, a.epochs, a.guide_epochs, a.predict_n = 1, 2, 2, 60
    if a.gpu:
        if a.model == DEFAULT_MODEL:
            ap.error("--gpu compares ViT-base/16 runs: pass --model /path/to/vit-base-patch16-224(-in21k)")
        try:
            import torch

            if not torch.cuda.is_available():
                ap.error("--gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
        except ImportError:
            ap.error("--gpu needs torch with CUDA")
        a.suite = "guide"

    t_bench = time.time()
    workdir = a.workdir or tempfile.mkdtemp(prefix="vitlora-bench-")
    os.makedirs(workdir, exist_ok=True)
    logs = os.path.join(workdir, "logs")
    for d in (logs, os.path.join(workdir, "preds"), os.path.join(workdir, "runs")):
        os.makedirs(d, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))

    suites = ["lab", "guide"] if a.suite == "both" else [a.suite]
    ctx = {"workdir": workdir, "logs": logs, "env": env, "vitlora": None}

    vitlora_status = "skipped (--only reference)"
    if a.only != "reference":
        ctx["vitlora"] = find_vitlora()
        vitlora_status = "found: " + " ".join(ctx["vitlora"][:1]) if ctx["vitlora"] else "not available"
        print(f"vitlora CLI: {vitlora_status}", flush=True)

    pipelines = []
    for suite in suites:
        ref_name = "reference lab (Trainer)" if suite == "lab" else "reference guide (Trainer)"
        vit_name = "vitlora extend" if suite == "lab" else "vitlora replace"
        if a.only in ("all", "reference"):
            pipelines.append(Pipeline(ref_name, "reference", suite))
        if a.only in ("all", "vitlora"):
            pipelines.append(Pipeline(vit_name, "vitlora", suite))

    if "guide" in suites:
        if a.guide_data:
            ctx["guide_data"] = a.guide_data
        else:
            sys.path.insert(0, HERE)
            import make_guide_data

            ctx["guide_data"] = os.path.join(workdir, "guide_data")
            info = make_guide_data.build(ctx["guide_data"], a.data, 150, a.seed)
            print(f"guide data: {info}", flush=True)

    ctx["predict_dir"] = os.path.join(workdir, "predict_images")
    ctx["predict_paths"] = make_predict_dir(a.data, ctx["predict_dir"], a.predict_n)

    records, ceilings = [], []
    for rep in range(a.repeats):
        for suite in suites:
            ps = [p for p in pipelines if p.suite == suite]
            if rep % 2 == 1:
                ps = ps[::-1]  # interleave the order so drift in background load hits both alike
            for p in ps:
                if p.kind == "vitlora" and not ctx["vitlora"]:
                    records.append({"pipeline": p.name, "suite": suite, "kind": p.kind, "repeat": rep,
                                    "ok": False, "error": "not available"})
                    continue
                records.append(one_run(p, a, ctx, rep))
        if "lab" in suites and not a.gpu and not a.no_ceiling:
            c = ceiling_run(a, ctx, rep)
            if c:
                ceilings.append(c)

    summary = summarise(pipelines, records)
    table = markdown_table(pipelines, summary, a) + ceiling_lines(ceilings, summary, a.predict_n)
    try:
        import torch

        torch_info = {"version": torch.__version__, "threads": torch.get_num_threads()}
        if a.gpu and torch.cuda.is_available():
            torch_info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        torch_info = None
    cpu = None
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
    except OSError:
        pass
    result = {
        "load_note": "1-min load average before/after every subprocess is in runs[*].*_proc.loadavg_*",
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "bench_wall_s": time.time() - t_bench,
        "config": {k: v for k, v in vars(a).items()},
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu": cpu,
            "cpu_probes": cpu_probes(),
            "nproc": os.cpu_count(),
            "torch": torch_info,
            "vitlora_cli": vitlora_status,
            "loadavg_end": loadavg(),
        },
        "workdir": workdir if a.keep else None,
        "table_markdown": table,
        "summary": summary,
        "runs": records,
        "ceiling": ceilings,
    }
    out_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    print()
    print(
        f"median of {a.repeats} repeat(s); lab suite {a.epochs} epochs, guide suite {a.guide_epochs} epochs; "
        f"predict over {a.predict_n} JPEGs; val split {a.val_split}, seed {a.seed}"
    )
    print(table)
    loads = [x for r in records for k in ("train_proc", "predict_proc") if r.get(k)
             for x in (r[k].get("loadavg_before") or [])[:1] + (r[k].get("loadavg_after") or [])[:1]]
    if loads:
        print(f"1-min load average around the runs: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs "
              "(figures are wall-clock; CPU seconds per run are in the JSON)")
    print(f"\nraw numbers: {os.path.abspath(a.out)}")
    if a.save:
        saved = save_results(result, a, records)
        print(f"saved: {saved[0]} and {saved[1]}")
    if not a.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"workdir kept: {workdir}")
    return 0 if all(summary[p.name]["ok_runs"] or p.kind == "vitlora" for p in pipelines) else 1


if __name__ == "__main__":
    sys.exit(main())
