"""Load base models (hub id, local folder, or an earlier vitlora run) and wrap them with LoRA.

The hub is often unreachable (laptops on trains, locked-down clusters). transformers
retries for over a minute before failing; we check the local cache first, then probe
the hub once with a short timeout, and fail with one sentence that says what to do.
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

RUN_MARKER = "vitlora.json"


def quiet_transformers() -> None:
    """Silence load-time chatter (weight-loading bars, mismatched-size reports) we explain ourselves."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*ignore_mismatched_sizes.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / RUN_MARKER).is_file() and (p / "adapter_config.json").is_file()


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
        return True
    except Exception as exc:  # HTTP errors still mean the host answered
        import urllib.error

        return isinstance(exc, urllib.error.HTTPError)


def _offline_message(model_id: str) -> str:
    return (
        f"cannot load model '{model_id}': it is not a local folder, not in the Hugging Face cache, "
        "and the hub is unreachable (offline?); download it elsewhere and pass its folder with --model PATH"
    )


def _from_pretrained(cls: Any, model_id: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` with local-first resolution and a clear offline error."""
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
    if not hub_reachable():
        raise VitloraError(_offline_message(model_id))
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except OSError as exc:
        raise VitloraError(f"cannot load model '{model_id}': {str(exc).splitlines()[0]}") from None


def load_processor_config(model_id: str) -> dict[str, Any]:
    """The base model's preprocessing settings (`preprocessor_config.json`) as a dict."""
    from transformers import AutoImageProcessor

    if Path(model_id, "preprocessor_config.json").is_file():
        return json.loads(Path(model_id, "preprocessor_config.json").read_text())
    processor = _from_pretrained(AutoImageProcessor, model_id)
    return processor.to_dict()


def load_base(model_id: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a classifier to build on. A vitlora run directory is loaded merged (stacking runs).

    Returns (model in eval mode, info) where info records where the base came from.
    """
    quiet_transformers()
    from transformers import AutoModelForImageClassification

    if is_run_dir(model_id):
        from .run import load

        run = load(model_id, device="cpu", merge=True)
        model = run.model
        info = {"base_model": str(Path(model_id).resolve()), "stacked_on": run.settings.get("base_model")}
    else:
        if Path(model_id).is_dir() and (Path(model_id) / "adapter_config.json").is_file():
            raise VitloraError(f"{model_id} is a PEFT adapter without vitlora.json; pass its base model instead")
        model = _from_pretrained(AutoModelForImageClassification, model_id)
        info = {"base_model": str(Path(model_id).resolve()) if Path(model_id).exists() else model_id}
    if not getattr(model.config, "id2label", None):
        raise VitloraError(f"{model_id} is not an image classifier (no labels in its config)")
    model.config.id2label = {int(k): v for k, v in model.config.id2label.items()}
    return model.to(device).eval(), info


def wrap_lora(
    model: nn.Module,
    target_modules: list[str],
    head_name: str,
    rank: int,
    alpha: float,
    dropout: float,
) -> nn.Module:
    """Freeze the base, add LoRA to the targets, train the head in full (`modules_to_save`)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=[head_name],
        bias="none",
    )
    return get_peft_model(model, config)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) as PEFT's `print_trainable_parameters` reports them."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
