"""Load models: base classifiers (hub id, local folder, or an earlier vitlora run) and a run's model.

The hub is often unreachable (laptops on trains, locked-down clusters). transformers
retries for over a minute before failing; we check the local cache first, then probe
the hub once with a short timeout (`vitlora.hub.hub_unreachable_reason`), and fail with one
sentence that says what to do.

Stacking: a run directory given as a base is loaded merged (`load_run_model`), so a new
adapter trains on top of it; the `Run` object wrapping a loaded model lives in `vitlora.run`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import VitloraError
from .rundir import ADAPTER_CONFIG, PREPROCESSOR, is_run_dir, read_run_files


def quiet_transformers() -> None:
    """Silence load-time chatter (weight-loading bars, mismatched-size reports) we explain ourselves."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*ignore_mismatched_sizes.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _offline_message(model_id: str) -> str:
    return (
        f"cannot load model '{model_id}': it is not a local folder, not in the Hugging Face cache, "
        "and the hub is unreachable (offline?); download it elsewhere and pass its folder with --model PATH"
    )


def _from_pretrained(cls: Any, model_id: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` with local-first resolution and a clear offline error."""
    from .hub import hub_unreachable_reason

    if Path(model_id).exists():
        if not Path(model_id, "config.json").is_file() and cls.__name__.startswith("AutoModel"):
            raise VitloraError(f"{model_id} is not a model folder (no config.json)")
        try:
            return cls.from_pretrained(model_id, **kwargs)
        except (OSError, ValueError) as exc:
            raise VitloraError(f"cannot load model from {model_id}: {str(exc).splitlines()[0]}") from None
    try:
        return cls.from_pretrained(model_id, local_files_only=True, **kwargs)
    except OSError:
        pass
    if hub_unreachable_reason() is not None:
        raise VitloraError(_offline_message(model_id))
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except OSError as exc:
        raise VitloraError(f"cannot load model '{model_id}': {str(exc).splitlines()[0]}") from None


def load_processor_config(model_id: str) -> dict[str, Any]:
    """The base model's preprocessing settings (`preprocessor_config.json`) as a dict."""
    from transformers import AutoImageProcessor

    if Path(model_id, PREPROCESSOR).is_file():
        return json.loads(Path(model_id, PREPROCESSOR).read_text())
    processor = _from_pretrained(AutoImageProcessor, model_id)
    return processor.to_dict()


def load_base(model_id: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a classifier to build on. A vitlora run directory is loaded merged (stacking runs).

    Returns (model in eval mode, info) where info records where the base came from.
    """
    quiet_transformers()
    from transformers import AutoModelForImageClassification

    if is_run_dir(model_id):
        model, meta, _ = load_run_model(model_id, merge=True)
        info = {"base_model": str(model_id), "stacked_on": meta.get("base_model")}  # as given: no resolved local paths
    else:
        if Path(model_id).is_dir() and (Path(model_id) / ADAPTER_CONFIG).is_file():
            raise VitloraError(f"{model_id} is a PEFT adapter without vitlora.json; pass its base model instead")
        model = _from_pretrained(AutoModelForImageClassification, model_id)
        info = {"base_model": str(model_id)}  # the hub id or the path as the user gave it (vitlora.json is shared)
    if not getattr(model.config, "id2label", None):
        raise VitloraError(f"{model_id} is not an image classifier (no labels in its config)")
    model.config.id2label = {int(k): v for k, v in model.config.id2label.items()}
    return model.to(device).eval(), info


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """A small description of the backbone, to catch an adapter loaded onto the wrong base."""
    cfg = model.config
    return {
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "image_size": getattr(cfg, "image_size", None),
    }


def load_run_model(run_dir: str | Path, merge: bool = True,
                   base_model: str | None = None) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model on CPU, vitlora.json, labels.json) of a run: its base with the adapter (merged when `merge`).

    `base_model` overrides the base recorded in `vitlora.json` (e.g. the run was moved to
    another machine where the base lives elsewhere).
    """
    from .lora import merge_adapter_fast
    from .surgery import find_head

    run_dir = Path(run_dir)
    meta, labels_info = read_run_files(run_dir)
    id2label = {int(k): v for k, v in labels_info["id2label"].items()}
    base_id = base_model or meta["base_model"]
    model, _ = load_base(base_id)
    expected = meta.get("base_fingerprint")
    if expected and expected != base_fingerprint(model):
        raise VitloraError(
            f"base model {base_id} does not match the adapter in {run_dir} "
            f"(trained on {meta['base_model']}: {expected['model_type']}, hidden size {expected['hidden_size']}, "
            f"{expected['layers']} layers)"
        )
    head_name, head = find_head(model)
    if head.out_features != len(id2label):
        setattr(model, head_name, nn.Linear(head.in_features, len(id2label)))
    model.config.num_labels = len(id2label)
    model.config.id2label = id2label
    model.config.label2id = {v: k for k, v in id2label.items()}
    # merged inference of a plain LoRA adapter needs no PEFT (whose import alone costs seconds)
    if merge and merge_adapter_fast(model, run_dir):
        return model, meta, labels_info
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(run_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise VitloraError(
            f"the adapter in {run_dir} does not fit base model {base_id}: {str(exc).splitlines()[0]}"
        ) from None
    return (model.merge_and_unload() if merge else model), meta, labels_info
