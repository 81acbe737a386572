#!/usr/bin/env python
"""Reference pipeline: the PEFT docs' "Image classification using LoRA" guide (new task, new head).

Reproduces huggingface/peft ``docs/source/task_guides/image_classification_lora.md`` (the
Food-101 / ViT-base recipe) on a local ImageFolder, as the baseline for vitlora's new-head
training in ``benchmarks/bench.py``:

* ``load_dataset(...)`` -> here ``load_dataset("imagefolder", data_dir=--data, split="train")``;
  ``label2id`` / ``id2label`` from the dataset's ``label`` feature (the folder names);
* ``AutoImageProcessor.from_pretrained`` and the guide's transforms built from it -
  train: ``RandomResizedCrop(size["height"])`` + ``RandomHorizontalFlip()`` + ``ToTensor()`` +
  ``Normalize(image_mean, image_std)``; val: ``Resize(size["height"])`` +
  ``CenterCrop(size["height"])`` + ``ToTensor()`` + ``Normalize`` - applied lazily with
  ``Dataset.set_transform`` on ``dataset.train_test_split(...)`` splits;
* ``AutoModelForImageClassification.from_pretrained(ckpt, label2id=..., id2label=...,
  ignore_mismatched_sizes=True)`` -> a fresh head for the folder's classes;
* ``LoraConfig(r=16, lora_alpha=16, target_modules=[query, value], lora_dropout=0.1,
  bias="none", modules_to_save=["classifier"])`` + ``get_peft_model``;
* ``TrainingArguments(remove_unused_columns=False, eval_strategy="epoch",
  save_strategy="epoch", learning_rate=5e-3, per_device_train_batch_size=128,
  gradient_accumulation_steps=4, per_device_eval_batch_size=128, fp16=True,
  num_train_epochs=5, logging_steps=10, load_best_model_at_end=True,
  metric_for_best_model="accuracy", label_names=["labels"])``, the guide's ``collate_fn`` and
  accuracy ``compute_metrics``, ``Trainer(...).train()``, then ``trainer.evaluate(val_ds)``;
* inference as the guide does it: ``PeftConfig`` -> base model with the same label maps ->
  ``PeftModel.from_pretrained`` -> per image ``image_processor(image.convert("RGB"))`` ->
  forward -> argmax (here: softmax + top-k so the output matches the other pipelines).

Deviations from the guide:

* No torchvision here (it is broken in this environment), so the four transforms are
  re-implemented with PIL + torch, following torchvision's algorithms: RandomResizedCrop
  (scale 0.08-1, ratio 3/4-4/3, 10 tries then the centre-crop fallback, bilinear
  resize of the box with PIL's antialiasing), RandomHorizontalFlip p=0.5, Resize of the shorter
  side (bilinear, long side truncated like torchvision), CenterCrop with round(), ToTensor
  (uint8 HWC -> float CHW / 255), Normalize. Randomness comes from torch's global RNG as in
  torchvision (seeded by the Trainer).
* fp16 only with ``--device cuda``; on CPU the run is fp32 (the guide assumes a GPU).
* ``evaluate.load("accuracy")`` is replaced by the same formula in numpy (``evaluate`` is not
  installed and would need the hub).
* ``tokenizer=image_processor`` is ``processing_class=`` in transformers 5;
  ``evaluation_strategy`` is ``eval_strategy``.
* Split: the guide calls ``train_test_split(test_size=0.1)`` unseeded. Here the default
  ``--split stratified`` holds out the same files vitlora does for the same ``--val-split`` /
  ``--seed`` (defaults 0.2 / 0: per class, indices of the path-sorted rows shuffled with
  ``random.Random(seed)``, first ``round(fraction * n)`` held out), so accuracies compare on
  the same photos; ``--split guide`` uses ``train_test_split(test_size=--val-split,
  seed=--seed)``. ``--seed`` also seeds the Trainer.
* No hub: ``push_to_hub=False``, the adapter is written with ``save_pretrained`` to
  ``OUT/adapter`` (plus the processor and ``reference_meta.json`` with the label maps), model
  path is a local directory. LoRA target names are resolved for the installed transformers
  (4.x ``query``/``value``, 5.x ``q_proj``/``v_proj``).
* Checkpoints go to ``OUT/trainer`` (``save_strategy="epoch"`` as in the guide).
* Epochs default to the guide's 5 (``--epochs``).

Output: one JSON line on stdout (last line), same fields as ``reference_lab.py``:
``train_images_per_s`` (train images x epochs / seconds inside ``trainer.train()``, which
includes the guide's per-epoch eval and checkpointing), ``train_wall_s``, ``wall_s`` (process
start -> adapter saved), ``peak_rss_mb``, ``val_accuracy`` (``trainer.evaluate(val_ds)`` after
training, i.e. of the best checkpoint); ``--mode predict``: ``predict_images_per_s``,
``predict_wall_s`` (process start -> predictions JSON written).

Examples::

    python benchmarks/make_guide_data.py --out /tmp/vitlora_guide_data
    python benchmarks/reference_guide.py --data /tmp/vitlora_guide_data --epochs 5 --out /tmp/guide_run
    python benchmarks/reference_guide.py --mode predict --adapter /tmp/guide_run/adapter \\
        --predict-dir /work/shared/data/raccoon --json /tmp/guide_pred.json
"""

from _refcommon import (  # noqa: E402 - first: process start time before the heavy imports
    excl_eval_rate,
    list_images,
    peak_rss_mb,
    process_start_epoch,
    resolve_targets,
)

T_START = process_start_epoch()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time as _time  # noqa: E402

DEFAULT_MODEL = "/work/shared/models/deit-tiny-patch16-224"
DEFAULT_DATA = "/tmp/vitlora_guide_data"


def stratified_indices(dataset, fraction: float, seed: int):
    """Row indices (train, held-out) split the way vitlora's ``stratified_split`` does.

    Rows ordered by file path; per label (labels in sorted order, one shared
    ``random.Random(seed)``) a list of that label's rows is shuffled and the first
    ``round(fraction * n)`` are held out (at least 1 when n >= 2, never all of them).
    """
    import random

    from datasets import Image as DImage

    raw = dataset.cast_column("image", DImage(decode=False))
    paths = [rec["path"] or "" for rec in raw["image"]]
    names = dataset.features["label"].names
    labels = [names[i] for i in dataset["label"]]
    order = sorted(range(len(paths)), key=lambda i: paths[i])
    groups = {}
    for i in order:
        groups.setdefault(labels[i], []).append(i)
    rng = random.Random(seed)
    held = set()
    for lab in sorted(groups):
        idx = list(groups[lab])
        n = len(idx)
        k = round(fraction * n)
        if fraction > 0 and n >= 2:
            k = max(k, 1)
        k = min(k, n - 1)
        rng.shuffle(idx)
        held.update(idx[:k])
    return [i for i in order if i not in held], [i for i in order if i in held]


# --------------------------------------------------------------------------------------------
# torchvision.transforms equivalents (PIL + torch)
# --------------------------------------------------------------------------------------------


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


class RandomResizedCrop:
    """torchvision.transforms.RandomResizedCrop(size) for PIL input (bilinear, antialiased)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale = scale
        self.ratio = ratio

    def get_params(self, img):
        import torch

        width, height = img.size
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w = width
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = height
            w = int(round(h * max(self.ratio)))
        else:
            w, h = width, height
        i = (height - h) // 2
        j = (width - w) // 2
        return i, j, h, w

    def __call__(self, img):
        from PIL import Image

        i, j, h, w = self.get_params(img)
        # torchvision: resized_crop -> crop then resize((H, W)); PIL's resize with a box does both
        return img.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR, box=(j, i, j + w, i + h))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        import torch
        from PIL import Image

        if torch.rand(1) < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


class Resize:
    """torchvision.transforms.Resize(int): shorter side -> size, bilinear."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        from PIL import Image

        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short == self.size:
            return img
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return img.resize((new_w, new_h), Image.Resampling.BILINEAR)


class CenterCrop:
    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, img):
        w, h = img.size
        th, tw = self.size
        if tw > w or th > h:  # torchvision pads; not reachable after Resize(size)
            raise ValueError("CenterCrop larger than image")
        top = int(round((h - th) / 2.0))
        left = int(round((w - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))


class ToTensor:
    def __call__(self, img):
        import numpy as np
        import torch

        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


class Normalize:
    def __init__(self, mean, std):
        import torch

        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, t):
        return (t - self.mean) / self.std


# --------------------------------------------------------------------------------------------
# train mode
# --------------------------------------------------------------------------------------------


def train(args) -> dict:
    import numpy as np
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_dataset("imagefolder", data_dir=args.data, split="train")

    labels = dataset.features["label"].names
    label2id, id2label = dict(), dict()
    for i, label in enumerate(labels):
        label2id[label] = i
        id2label[i] = label

    image_processor = AutoImageProcessor.from_pretrained(args.model)
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    train_transforms = Compose(
        [
            RandomResizedCrop(image_processor.size["height"]),
            RandomHorizontalFlip(),
            ToTensor(),
            normalize,
        ]
    )
    val_transforms = Compose(
        [
            Resize(image_processor.size["height"]),
            CenterCrop(image_processor.size["height"]),
            ToTensor(),
            normalize,
        ]
    )

    def preprocess_train(example_batch):
        example_batch["pixel_values"] = [train_transforms(image.convert("RGB")) for image in example_batch["image"]]
        return example_batch

    def preprocess_val(example_batch):
        example_batch["pixel_values"] = [val_transforms(image.convert("RGB")) for image in example_batch["image"]]
        return example_batch

    if args.split == "guide":
        splits = dataset.train_test_split(test_size=args.val_split, seed=args.seed)
        train_ds = splits["train"]
        val_ds = splits["test"]
    else:  # the same held-out files as vitlora with the same --val-split / --seed
        train_idx, val_idx = stratified_indices(dataset, args.val_split, args.seed)
        train_ds = dataset.select(train_idx)
        val_ds = dataset.select(val_idx)
    train_ds.set_transform(preprocess_train)
    val_ds.set_transform(preprocess_val)

    model = AutoModelForImageClassification.from_pretrained(
        args.model,
        label2id=label2id,
        id2label=id2label,
        ignore_mismatched_sizes=True,
    )
    targets = resolve_targets(model)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        target_modules=targets,
        lora_dropout=args.dropout,
        bias="none",
        modules_to_save=["classifier"],
    )
    lora_model = get_peft_model(model, config)
    lora_model.print_trainable_parameters()

    batch_size = 128
    trainer_dir = args.trainer_dir or os.path.join(args.out, "trainer")
    targs = TrainingArguments(
        trainer_dir,
        remove_unused_columns=False,
        eval_strategy="epoch",
        save_strategy="epoch",
        learning_rate=args.lr,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=4,
        per_device_eval_batch_size=batch_size,
        fp16=args.device == "cuda",
        num_train_epochs=args.epochs,
        logging_steps=10,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        push_to_hub=False,
        label_names=["labels"],
        seed=args.seed,
        use_cpu=args.device == "cpu",
        report_to="none",
    )

    def compute_metrics(eval_pred):
        """Computes accuracy on a batch of predictions (evaluate's "accuracy", in numpy)."""
        predictions = np.argmax(eval_pred.predictions, axis=1)
        return {"accuracy": float((predictions == eval_pred.label_ids).mean())}

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example["label"] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}

    trainer = Trainer(
        lora_model,
        targs,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=image_processor,
        compute_metrics=compute_metrics,
        data_collator=collate_fn,
    )
    t0 = _time.perf_counter()
    train_results = trainer.train()
    train_wall = _time.perf_counter() - t0
    n_images_trained = len(train_ds) * args.epochs
    rate_excl_eval = excl_eval_rate(trainer, n_images_trained, train_wall)  # before any later evaluate()

    adapter_dir = os.path.join(args.out, "adapter")
    lora_model.save_pretrained(adapter_dir)
    image_processor.save_pretrained(adapter_dir)
    with open(os.path.join(adapter_dir, "reference_meta.json"), "w") as fh:
        json.dump(
            {
                "pipeline": "reference_guide",
                "mode": "new_head",
                "base_model": os.path.abspath(args.model),
                "id2label": {str(k): v for k, v in id2label.items()},
                "label2id": label2id,
            },
            fh,
            indent=1,
        )
    wall_saved = _time.time() - T_START

    t_eval = _time.perf_counter()
    final_eval = trainer.evaluate(val_ds)
    eval_wall = _time.perf_counter() - t_eval

    n_train = len(train_ds)
    return {
        "pipeline": "reference_guide",
        "mode": "train",
        "data": os.path.abspath(args.data),
        "classes": labels,
        "epochs": args.epochs,
        "n_train": n_train,
        "n_val": len(val_ds),
        "lr": args.lr,
        "lora": {"r": args.rank, "alpha": args.alpha, "dropout": args.dropout, "targets": targets},
        "optimizer_steps": trainer.state.global_step,
        "train_images_per_s": n_images_trained / train_wall,
        "train_wall_s": train_wall,
        # the same figure without the per-epoch evaluation that runs inside trainer.train()
        "train_images_per_s_excl_eval": rate_excl_eval,
        "wall_s": wall_saved,
        "peak_rss_mb": None,
        "val_accuracy": final_eval.get("eval_accuracy"),
        "val_loss": final_eval.get("eval_loss"),
        "final_eval_wall_s": eval_wall,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "trainer_metrics": train_results.metrics,
        "log_history": [r for r in trainer.state.log_history if "eval_loss" in r or "train_runtime" in r],
        "adapter_dir": adapter_dir,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# predict mode: the guide's inference, one image at a time from files
# --------------------------------------------------------------------------------------------


def predict(args) -> dict:
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.predict_dir:
        raise SystemExit("--mode predict needs --predict-dir")
    files = list_images(args.predict_dir)
    if args.adapter:
        from peft import PeftConfig, PeftModel

        with open(os.path.join(args.adapter, "reference_meta.json")) as fh:
            meta = json.load(fh)
        id2label = {int(k): v for k, v in meta["id2label"].items()}
        label2id = meta["label2id"]
        config = PeftConfig.from_pretrained(args.adapter)
        base = args.model if args.model_given else config.base_model_name_or_path
        model = AutoModelForImageClassification.from_pretrained(
            base,
            label2id=label2id,
            id2label=id2label,
            ignore_mismatched_sizes=True,
        )
        inference_model = PeftModel.from_pretrained(model, args.adapter)
        image_processor = AutoImageProcessor.from_pretrained(args.adapter)
    else:
        inference_model = AutoModelForImageClassification.from_pretrained(args.model)
        image_processor = AutoImageProcessor.from_pretrained(args.model)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    inference_model.to(device)
    inference_model.eval()
    t_ready = _time.time() - T_START

    preds = []
    t0 = _time.perf_counter()
    for path in files:
        image = Image.open(path)
        encoding = image_processor(image.convert("RGB"), return_tensors="pt").to(device)
        with torch.no_grad():
            outputs = inference_model(**encoding)
            logits = outputs.logits
        probs = F.softmax(logits, dim=-1)
        top = torch.topk(probs, k=min(args.top_k, probs.shape[-1]))
        preds.append(
            {
                "path": path,
                "top_k": [
                    {"label": inference_model.config.id2label[int(i)], "index": int(i), "score": float(s)}
                    for i, s in zip(top.indices[0], top.values[0])
                ],
            }
        )
    loop_wall = _time.perf_counter() - t0
    with open(args.json or os.devnull, "w") as fh:
        json.dump(preds, fh)
    wall = _time.time() - T_START
    return {
        "pipeline": "reference_guide",
        "mode": "predict",
        "adapter": args.adapter,
        "n_images": len(files),
        "predict_images_per_s": len(files) / wall if files else None,
        "predict_wall_s": wall,
        "predict_loop_images_per_s": len(files) / loop_wall if files else None,
        "predict_loop_wall_s": loop_wall,
        "load_wall_s": t_ready,
        "peak_rss_mb": None,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Reference: the PEFT image-classification LoRA guide on an ImageFolder (see module docstring)."
    )
    ap.add_argument("--mode", choices=["train", "predict"], default="train")
    ap.add_argument("--model", default=None, help=f"base model dir (default {DEFAULT_MODEL})")
    ap.add_argument("--data", default=DEFAULT_DATA, help="ImageFolder dir: one sub-folder per class")
    ap.add_argument("--out", default="/tmp/vitlora_reference_guide", help="train: run dir (adapter/ inside)")
    ap.add_argument("--trainer-dir", default=None, help="Trainer output_dir (default OUT/trainer)")
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--val-split", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=["stratified", "guide"], default="stratified",
                    help="stratified: vitlora's seeded per-class split (default); "
                         "guide: datasets' train_test_split(test_size, seed)")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                    help="cpu: fp32 on CPU; cuda: fp16 as in the guide")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--adapter", default=None, help="predict: saved adapter dir (omit: base model)")
    ap.add_argument("--predict-dir", default=None)
    ap.add_argument("--json", default=None, help="where to write the predictions")
    ap.add_argument("--top-k", type=int, default=5)
    args = ap.parse_args(argv)
    args.model_given = args.model is not None
    args.model = args.model or DEFAULT_MODEL
    if args.epochs == int(args.epochs):
        args.epochs = int(args.epochs)

    result = train(args) if args.mode == "train" else predict(args)
    result["peak_rss_mb"] = peak_rss_mb()
    result["process_wall_s"] = _time.time() - T_START
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
