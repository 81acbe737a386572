"""Training settings: one dataclass, the single source of truth for a run.

`TrainConfig` is what the CLI fills from flags (over an optional `--config` file), what
`vitlora.train()` takes, and what `vitlora.json` stores so a run can be re-run or resumed
exactly.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import VitloraError

DEFAULT_MODEL = "facebook/deit-tiny-patch16-224"
SEMANTIC_TARGETS = ("query", "key", "value", "output", "mlp")


@dataclass
class TrainConfig:
    """Everything that decides what a training run does."""

    data: str = ""
    val: str | None = None
    negatives: str | None = None
    model: str = DEFAULT_MODEL
    out: str | None = None
    mode: str | None = None  # replace | extend; None = infer (extend when --label is given)
    label: str | None = None
    # LoRA
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    # optimisation
    epochs: int = 5
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of optimizer steps spent warming up
    label_smoothing: float = 0.0
    # data
    val_split: float = 0.1
    seed: int = 0
    aug_scale_min: float = 0.25
    strict: bool = False
    # runtime
    precision: str = "auto"
    device: str = "auto"
    early_stopping: int | None = None
    # extend-mode safeguards (see vitlora.extend)
    distill: float = 1.0  # weight of the distillation loss on old classes
    target_recall: float | None = 0.95  # bias calibration target on held-out positives
    lora_lr_scale: float | None = None  # LoRA lr = lr * this; None: 0.1 in extend mode (head at full lr), else 1

    def validate(self) -> None:
        """Reject impossible values with one clear sentence each."""
        if not self.data:
            raise VitloraError("no training data given")
        if self.mode not in (None, "replace", "extend"):
            raise VitloraError(f"--mode must be replace or extend, not {self.mode!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise VitloraError(f"--precision must be auto, fp32, bf16 or fp16, not {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise VitloraError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        checks = [
            (self.rank >= 1, "--rank must be at least 1"),
            (self.alpha > 0, "--alpha must be positive"),
            (0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (self.weight_decay >= 0, "--weight-decay must be non-negative"),
            (0.0 <= self.val_split < 1.0, "--val-split must be in [0, 1)"),
            (0.0 < self.aug_scale_min <= 1.0, "--aug-scale-min must be in (0, 1]"),
            (self.early_stopping is None or self.early_stopping >= 1, "--early-stopping must be at least 1"),
            (0.0 <= self.warmup < 1.0, "--warmup must be in [0, 1)"),
            (self.distill >= 0, "--distill must be non-negative"),
            (self.target_recall is None or 0 < self.target_recall <= 1, "--target-recall must be in (0, 1]"),
            (self.lora_lr_scale is None or self.lora_lr_scale > 0, "--lora-lr-scale must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise VitloraError(message)
        if self.negatives and (self.mode == "replace" or (self.mode is None and not self.label)):
            raise VitloraError("--negatives is for extend mode (--label NAME, or --mode extend for an ImageFolder)")
        unknown = [t for t in self.targets if t not in SEMANTIC_TARGETS]
        if not self.targets or unknown:
            raise VitloraError(
                f"unknown --targets {', '.join(unknown) or '(empty)'}: choose from {', '.join(SEMANTIC_TARGETS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise VitloraError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values = dict(values)
        if isinstance(values.get("targets"), str):
            values["targets"] = parse_targets(values["targets"])
        return cls(**values)


def parse_targets(text: str) -> list[str]:
    return [t.strip().lower() for t in text.split(",") if t.strip()]


def read_config_file(path: str) -> dict[str, Any]:
    """Read a JSON or TOML settings file (keys are TrainConfig field names, `-` or `_`)."""
    p = Path(path)
    if not p.is_file():
        raise VitloraError(f"config file not found: {path}")
    try:
        if p.suffix.lower() == ".toml":
            raw = tomllib.loads(p.read_text())
        else:
            raw = json.loads(p.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise VitloraError(f"cannot parse config file {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise VitloraError(f"config file {path} must hold a table/object of settings")
    # a saved run's vitlora.json nests the settings under "config"
    if "config" in raw and isinstance(raw["config"], dict):
        raw = raw["config"]
    return {k.replace("-", "_"): v for k, v in raw.items()}
