"""Model card (README.md) for a vitlora run, in the Hugging Face hub's format.

A LoRA adapter is useless without knowing its base model, its label list and
how to put the two together, so the card's main job is a usage snippet that
works with plain transformers + peft (no vitlora needed), plus honest numbers:
the per-epoch metrics the run measured, not claims. The YAML front matter is
built with `huggingface_hub.ModelCardData` and re-parsed before returning, so
a card that the hub would reject for bad metadata fails here instead.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import PurePath
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = ["render_model_card", "best_val_accuracy", "strip_local_paths"]

MAX_LISTED_LABELS = 50
MAX_LISTED_SETTING_ITEMS = 20
TAGS = ["vitlora", "lora", "image-classification"]
# org/name or name, as the hub spells model ids; anything else is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")  # POSIX, home, Windows drive or UNC


def strip_local_paths(value: Any) -> Any:
    """`value` with every absolute local path (in any nested str) cut to its last part: cards and pushed
    files say which folder, never where it lay on the trainer's disk."""
    if isinstance(value, dict):
        return {k: strip_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strip_local_paths(v) for v in value]
    if isinstance(value, str) and _ABSOLUTE.match(value):
        return PurePath(value.replace("\\", "/")).name or value
    return value


def _printable(text: str) -> str:
    """Text any UTF-8 file can hold: lone surrogates (e.g. a non-UTF-8 folder name as os.fsdecode keeps it)
    become U+FFFD instead of failing the write."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def best_val_accuracy(metrics: dict[str, Any]) -> float | None:
    """The validation accuracy to advertise: `metrics["best_val_accuracy"]` when recorded
    (the epoch whose weights were kept), else the highest per-epoch `val_accuracy`."""
    recorded = metrics.get("best_val_accuracy")
    if _is_number(recorded):
        return float(recorded)
    values = [e.get("val_accuracy") for e in metrics.get("epochs") or [] if isinstance(e, dict)]
    values = [float(v) for v in values if _is_number(v)]
    return max(values) if values else None


def render_model_card(
    settings: dict[str, Any],
    metrics: dict[str, Any],
    labels: list[str],
    base_model: str,
    new_labels: list[str] | None = None,
    *,
    repo_id: str | None = None,
) -> str:
    """Return a hub model card (README.md text) for a trained vitlora adapter.

    `settings` are the training settings (shown as a table; `license`, `mode`,
    `task`, `dataset` and `repo_id` are also read if present), `metrics` holds
    `epochs`: a list of dicts with `epoch, train_loss, val_loss, val_accuracy,
    images_per_s, wall_s` (any may be missing). `labels` is the full label
    list in class-index order; `new_labels` the labels added on top of the base
    model's in extend mode. `repo_id` (or `settings["repo_id"]`) is what the
    usage snippet loads the adapter from; without it the snippet points at a
    local folder.
    """
    labels = [_printable(str(label)) for label in labels]
    new_labels = [_printable(str(label)) for label in new_labels] if new_labels else None
    settings, metrics = strip_local_paths(settings), strip_local_paths(metrics)
    mode = str(settings.get("mode") or ("extend" if new_labels else "replace"))
    adapter_ref = repo_id or settings.get("repo_id") or "path/to/run-folder"
    is_hub_id = bool(_HUB_ID.match(base_model))
    base_model = strip_local_paths(base_model)
    base_name = base_model if is_hub_id else (PurePath(base_model).name or base_model)
    title = settings.get("name") or repo_id or settings.get("repo_id") or f"LoRA adapter for {base_name}"

    front = _front_matter(settings, metrics, base_model if is_hub_id else None, str(title))
    sections = [
        f"# {title}",
        _summary(settings, labels, base_model, mode, new_labels),
        _usage(labels, base_model, str(adapter_ref), new_labels),
        _settings_table(settings),
        _metrics_table(metrics),
        _limits(labels, base_model, mode, new_labels, is_hub_id),
    ]
    text = _printable(f"---\n{front}---\n\n" + "\n\n".join(s.strip() for s in sections) + "\n")
    ModelCard(text)  # re-parse: raises if the front matter is not valid YAML metadata
    return text


# --- front matter ---------------------------------------------------------------------


def _front_matter(settings: dict[str, Any], metrics: dict[str, Any], base_model: str | None,
                  title: str) -> str:
    best = best_val_accuracy(metrics)
    eval_results = None
    if best is not None:
        dataset = str(settings.get("dataset") or settings.get("data") or "imagefolder")
        dataset = PurePath(dataset).name or dataset  # a local folder's name, not the whole path
        eval_results = [EvalResult(
            task_type="image-classification", task_name="Image Classification",
            dataset_type="imagefolder", dataset_name=dataset, dataset_split="validation",
            metric_type="accuracy", metric_name="Validation accuracy", metric_value=round(best, 4),
        )]
    data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        pipeline_tag="image-classification",
        tags=list(TAGS),
        license=str(settings["license"]) if settings.get("license") else None,
        model_name=title if eval_results else None,
        eval_results=eval_results,
    )
    yaml_text = data.to_yaml()
    return yaml_text if yaml_text.endswith("\n") else yaml_text + "\n"


# --- body sections --------------------------------------------------------------------


def _summary(settings: dict[str, Any], labels: list[str], base_model: str, mode: str,
             new_labels: list[str] | None) -> str:
    task = settings.get("task") or "image classification"
    lines = [
        "## Summary",
        "",
        f"A LoRA adapter for **{_md(base_model)}**, trained with "
        f"vitlora for {_md(str(task))}.",
        "",
        f"- Mode: **{_md(mode)}** ("
        + ("the base model's labels are kept and new ones added" if mode == "extend"
           else "the base model's classifier is replaced by one for these labels") + ")",
        f"- Labels: {len(labels)}",
    ]
    if len(labels) <= MAX_LISTED_LABELS:
        lines.append(f"- Label list (class index order): {_label_list(labels)}")
    elif new_labels:
        n_base = len(labels) - len(new_labels)
        lines.append(f"- New labels: {_label_list(new_labels)} + the base model's {n_base}")
    else:
        shown = labels[:MAX_LISTED_LABELS]
        lines.append(f"- First {len(shown)} labels: {_label_list(shown)} "
                     f"(+ {len(labels) - len(shown)} more; see `id2label` in the usage code)")
    return "\n".join(lines)


def _usage(labels: list[str], base_model: str, adapter_ref: str,
           new_labels: list[str] | None) -> str:
    n_base = len(labels) - len(new_labels) if new_labels else 0
    if new_labels and len(labels) > MAX_LISTED_LABELS and labels[n_base:] == new_labels:
        # Too many to inline: take the base model's labels from its config.
        label_code = (
            "base_config = AutoConfig.from_pretrained(base)\n"
            f"labels = [base_config.id2label[i] for i in range({n_base})] + {new_labels!r}\n"
        )
        imports = "from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification"
    else:
        label_code = f"labels = {labels!r}\n"
        imports = "from transformers import AutoImageProcessor, AutoModelForImageClassification"
    code = (
        "import torch\n"
        "from PIL import Image\n"
        "from peft import PeftModel\n"
        f"{imports}\n"
        "\n"
        f"base = {base_model!r}\n"
        f"{label_code}"
        "model = AutoModelForImageClassification.from_pretrained(\n"
        "    base,\n"
        "    num_labels=len(labels),\n"
        "    id2label=dict(enumerate(labels)),\n"
        "    label2id={label: i for i, label in enumerate(labels)},\n"
        "    ignore_mismatched_sizes=True,  # the base model's head has a different size\n"
        ")\n"
        f"model = PeftModel.from_pretrained(model, {adapter_ref!r}).eval()\n"
        "processor = AutoImageProcessor.from_pretrained(base)\n"
        "\n"
        'inputs = processor(images=Image.open("photo.jpg").convert("RGB"), return_tensors="pt")\n'
        "with torch.no_grad():\n"
        "    probs = model(**inputs).logits.softmax(-1)[0]\n"
        "print(labels[int(probs.argmax())], float(probs.max()))\n"
    )
    return (
        "## Usage\n\n"
        "With plain transformers + peft:\n\n"
        f"```python\n{code}```\n\n"
        "With vitlora:\n\n"
        f"```python\nimport vitlora\n\nprint(vitlora.load({adapter_ref!r}).predict([\"photo.jpg\"]))\n```"
    )


def _settings_table(settings: dict[str, Any]) -> str:
    rows = [f"| {_cell(key)} | {_cell(_format_setting(value))} |"
            for key, value in settings.items() if value is not None]
    if not rows:
        return "## Training settings\n\nNo settings were recorded."
    return "## Training settings\n\n| setting | value |\n|---|---|\n" + "\n".join(rows)


def _metrics_table(metrics: dict[str, Any]) -> str:
    epochs = [e for e in metrics.get("epochs") or [] if isinstance(e, dict)]
    # (key, column title, decimals): losses/accuracy need 4 digits, throughput does not.
    columns = [("epoch", "epoch", 0), ("train_loss", "train loss", 4), ("val_loss", "val loss", 4),
               ("val_accuracy", "val accuracy", 4)]
    columns += [c for c in (("images_per_s", "images/s", 1), ("wall_s", "wall s", 1))
                if any(c[0] in e for e in epochs)]
    parts = ["## Measured metrics"]
    if epochs:
        parts.append("Measured by vitlora during training, once per epoch, on the validation split.")
        table = ["| " + " | ".join(title for _, title, _ in columns) + " |",
                 "|" + "---|" * len(columns)]
        table += ["| " + " | ".join(_cell(_format_metric(e.get(k), d)) for k, _, d in columns) + " |"
                  for e in epochs]
        parts.append("\n".join(table))
        best = best_val_accuracy(metrics)
        if best is not None:
            parts.append(f"Best validation accuracy: **{best:.4f}**.")
    else:
        parts.append("No per-epoch metrics were recorded.")
    others = {k: v for k, v in metrics.items() if k != "epochs" and _is_number(v)}
    if others:
        parts.append("Run totals:\n\n" + "\n".join(
            f"- `{k}`: {_format_metric(v, 4 if abs(v) < 10 else 1)}" for k, v in others.items()))
    return "\n\n".join(parts)


def _limits(labels: list[str], base_model: str, mode: str, new_labels: list[str] | None,
            is_hub_id: bool) -> str:
    lines = [
        "## Limits",
        "",
        "- Accuracy was measured (if at all) on a validation split of the training data; expect "
        "lower accuracy on photos from other cameras, places or sources.",
        f"- The model always answers with one of its {len(labels)} labels, even for an image "
        "that shows none of them; use the probability, not just the top label.",
        f"- This is an adapter, not a full model: it only works on top of `{base_model}` "
        "(load that exact base model first, as above), and it inherits that model's biases.",
    ]
    if mode == "extend" and new_labels:
        lines.append(f"- Extend mode: the base model's {len(labels) - len(new_labels)} labels were "
                     "not re-evaluated here unless the validation data contained them.")
    if not is_hub_id:
        lines.append(f"- The base model was loaded from a local folder (`{base_model}`), so the "
                     "metadata has no `base_model`; replace the path with the base model's hub "
                     "id before sharing.")
    return "\n".join(lines)


# --- formatting helpers ---------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _format_metric(value: Any, decimals: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.{decimals}f}"
    return str(value)


def _format_setting(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LISTED_SETTING_ITEMS:
            return f"({len(value)} items)"
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def _md(text: str) -> str:
    """Neutralise characters that would turn label text into markdown/HTML."""
    return re.sub(r"([\\`*_<>\[\]|])", r"\\\1", text)


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _label_list(labels: list[str]) -> str:
    return ", ".join(f"`{label.replace('`', chr(39))}`" for label in labels)
