"""vitlora: fine-tune Hugging Face vision transformers with LoRA.

Python API (the CLI is a thin layer over it):

    import vitlora
    run = vitlora.train(vitlora.TrainConfig(data="photos/", label="raccoon", model="facebook/deit-tiny-patch16-224"))
    run = vitlora.load("runs/photos-raccoon")
    run.predict(["a.jpg"], top_k=5)
    vitlora.evaluate(run, "test_photos/", label="raccoon")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["TrainConfig", "Run", "train", "train_to_dir", "load", "evaluate", "VitloraError", "__version__"]

_LAZY = {
    "TrainConfig": ("vitlora.config", "TrainConfig"),
    "Run": ("vitlora.run", "Run"),
    "load": ("vitlora.run", "load"),
    "train": ("vitlora.training", "train"),
    "train_to_dir": ("vitlora.training", "train_to_dir"),
    "evaluate": ("vitlora.evaluation", "evaluate"),
    "VitloraError": ("vitlora.errors", "VitloraError"),
}


def __getattr__(name: str) -> Any:
    """Import heavy modules (torch, transformers) only when the API is used."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'vitlora' has no attribute {name!r}")
