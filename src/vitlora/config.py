"""Training settings: one dataclass, the single source of truth for a run.

`TrainConfig` is what the CLI fills from flags (over an optional `--config` file), what
`vitlora.train()` takes, and what `vitlora.json` stores so a run can be re-run or resumed
exactly. Each field carries its help text beside its default (peft's
`field(metadata={"help": ...})` style); `vitlora train --help` is generated from it.
An older `vitlora.json` without the newer fields loads with their defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from .errors import VitloraError

DEFAULT_MODEL = "facebook/deit-tiny-patch16-224"
SEMANTIC_TARGETS = ("query", "key", "value", "output", "mlp")
METHODS = ("lora", "dora", "rslora", "loha", "lokr")
AUGMENT_POLICIES = ("basic", "trivial", "randaugment")
ACTIVATION_MB_ENV = "VITLORA_ACTIVATION_MB"  # overrides `activation_mb` (read once, in __post_init__)


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    """Everything that decides what a training run does."""

    data: str = _f("", "training data: an ImageFolder (one sub-folder per class), a flat folder of one class with "
                       "--label, a CSV/JSONL manifest of path,label, or hf:NAME[:CONFIG]/SPLIT")
    val: str | None = _f(None, "validation data (default: hold out --val-split of DATA)")
    negatives: str | None = _f(None, "unlabelled photos of other things (any folder tree): extend mode learns where "
                                     "the new classes end; replace mode learns to answer 'unknown' for them; "
                                     "`python -m vitlora.negatives DIR` makes a starter set")
    model: str = _f(DEFAULT_MODEL, "hub id or local folder of the base model, or an earlier run to stack on")
    out: str | None = _f(None, "run directory to write (default runs/<data>-<label|mode>)")
    mode: str | None = _f(None, "replace: new head for the data's labels; extend: keep the base classes and add "
                                "the new ones (default: extend with --label, else replace)")
    label: str | None = _f(None, "class name for a flat folder of images (implies --mode extend)")
    # LoRA
    rank: int = _f(8, "LoRA rank r")
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha/r")
    dropout: float = _f(0.1, "LoRA dropout")
    targets: list[str] = field(default_factory=lambda: ["query", "value"],
                               metadata={"help": "comma-separated: query,key,value,output,mlp"})
    method: str = _f("lora", "adapter: lora, dora (weight-decomposed), rslora (alpha/sqrt(r) scaling), loha or lokr "
                             "(peft's LoHa / LoKr; --rank and --alpha apply, --dropout as their rank dropout)")
    # optimisation
    epochs: int = _f(5, "number of epochs")
    batch_size: int = _f(32, "global batch size")
    grad_accum: int = _f(1, "gradient accumulation steps")
    lr: float = _f(2e-3, "peak learning rate, warmup then cosine decay")
    weight_decay: float = _f(0.01, "AdamW weight decay (not on biases, norms or frozen head rows)")
    warmup: float = _f(0.1, "fraction of optimizer steps spent warming up")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy, in [0, 1)")
    # data
    val_split: float = _f(0.1, "fraction held out when no --val")
    seed: int = _f(0, "seed for split, init, shuffling, augmentation and the negatives' order")
    aug_scale_min: float = _f(0.25, "smallest random-resized-crop area fraction")
    augment: str = _f("basic", "augmentation policy after the random resized crop + flip: basic (none), trivial "
                               "(TrivialAugment) or randaugment (RandAugment); needs kornia beyond basic")
    mixup: float = _f(0.0, "mixup Beta(A, A) concentration, 0 = off (replace mode; kornia)")
    cutmix: float = _f(0.0, "cutmix Beta(A, A) concentration, 0 = off; with --mixup each batch uses one of the two "
                            "(replace mode; kornia)")
    random_erasing: float = _f(0.0, "per-image probability of random erasing (kornia)")
    class_weights: str = _f("none", "none, or auto: weight the loss by inverse class frequency (normalised to a "
                                    "mean weight of 1 per image), for imbalanced data (replace mode)")
    balanced_sampler: bool = _f(False, "draw each epoch's images with probability inverse to their class "
                                       "frequency (with replacement), so every class is seen equally often")
    strict: bool = _f(False, "unreadable images are an error instead of a skip")
    # runtime
    precision: str = _f("auto", "auto picks bf16 where the hardware has bf16 matrix units, else fp32/fp16")
    device: str = _f("auto", "auto, cpu or cuda")
    patch_keep: float | None = _f(None, "PatchDropout: fraction of each training image's patch tokens kept (CLS "
                                        "always; evaluation and prediction use all tokens). Default: 0.5 on a ViT / "
                                        "DeiT in a first extension of one class without --negatives, where it "
                                        "measured equal recall, false positives and retention; else 1 (off: it "
                                        "cost replace mode accuracy on fine-grained breeds)")
    train_size: int | None = _f(None, "side in pixels of the training crops (a multiple of the patch size): "
                                      "fewer patch tokens per training image, position embeddings interpolated; "
                                      "validation, thresholds and prediction stay at the model's size. Default: "
                                      "5/7 of the model's side (224 -> 160) on a ViT / DeiT in single-label runs "
                                      "without --negatives that are not stacked on an extended run, where it "
                                      "measured equal quality; else the model's side; 0 = the model's side")
    ema: float = _f(0.0, "decay of an exponential moving average of the trainable weights, e.g. 0.999 (0 = off); "
                         "each epoch evaluates it beside the raw weights and keeps the better")
    early_stopping: int | None = _f(None, "stop after PATIENCE epochs without a better epoch (validation accuracy, "
                                          "then lower loss), whatever the training loss does")
    auto_stop: int = _f(2, "stop after N epochs without a better epoch once the training loss has also converged "
                           "(fell by less than 10 percent over them), so no later epoch is likely to win; 0 = off")
    activation_mb: float = _f(384.0, "CPU: activation memory budget per micro-batch in MiB; larger batches run as "
                                     f"equal micro-batches that fit it (env {ACTIVATION_MB_ENV} overrides)")
    # extend-mode safeguards (see vitlora.extend)
    distill: float = _f(1.0, "extend mode: weight of distillation from the frozen base on the old classes")
    temperature: float = _f(1.0, "extend mode: distillation temperature")
    target_recall: float | None = _f(0.97, "extend mode: calibrate the new classes' bias to this recall on "
                                           "out-of-fold positives (0.95 gave 0.960 / 0.933 recall on 5 raccoon folds "
                                           "with / without --negatives, 0.97 gave 0.973 / 0.960)")
    lora_lr_scale: float | None = _f(None, "LoRA learning rate as a fraction of --lr (default: 0.1 in extend mode, "
                                           "which keeps the base's old-class answers; 1 in replace mode)")
    lp_steps: int = _f(100, "extend mode: Adam steps of the linear probe that fits the new head rows on the frozen "
                            "base's features before LoRA training (0: off)")
    lp_lr: float = _f(0.05, "extend mode: learning rate of that linear probe")
    row_norm_cap: float | None = _f(None, "extend mode: the probe keeps each new head row's L2 norm at most this "
                                          "multiple of the median norm of the base's rows (0: no cap; default: 1.5 "
                                          "with --negatives or when a first extension adds several classes, else "
                                          "no cap). "
                                          "Unbounded rows grew ~9x and gave the new class 3-4 in 100 ImageNet photos")
    # honest probabilities, out-of-fold thresholds, "unknown" (see vitlora.calibration, vitlora.reject)
    no_calibrate: bool = _f(False, "keep the raw probabilities (by default a temperature is folded into the head: "
                                   "fitted on the validation split in replace mode, on the out-of-fold logits in "
                                   "extend mode with negatives)")
    cv_folds: int = _f(5, "extend mode: folds over all photos for the out-of-fold threshold and summary (0: "
                          "calibrate on the held-out photos only)")
    oe_weight: float = _f(0.5, "replace mode with --negatives: weight of the outlier-exposure loss on negatives")
    unknown_keep: float = _f(0.95, "replace mode with --negatives: share of validation photos that keep their answer "
                                   "when the 'unknown' answer is placed")
    # experiment tracking (optional extras, see vitlora.tracking)
    report_to: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated: tensorboard, mlflow (optional extras, off by default): log the settings, per-step "
                "loss and learning rate, per-epoch validation metrics; TensorBoard writes RUN_DIR/tensorboard, "
                "MLflow RUN_DIR/mlflow.db unless MLFLOW_TRACKING_URI is set"})

    def __post_init__(self) -> None:
        override = os.environ.get(ACTIVATION_MB_ENV)
        if override:
            try:
                self.activation_mb = float(override)
            except ValueError:
                raise VitloraError(f"{ACTIVATION_MB_ENV} must be a number of MiB, not {override!r}") from None

    @property
    def resolved_mode(self) -> str:
        """replace or extend: `mode`, else extend when a `label` names a flat folder's class."""
        return self.mode or ("extend" if self.label else "replace")

    def validate(self) -> None:
        """Reject impossible values with one clear sentence each."""
        check_types(dataclasses.asdict(self))
        if not self.data:
            raise VitloraError("no training data given")
        if self.mode not in (None, "replace", "extend"):
            raise VitloraError(f"--mode must be replace or extend, not {self.mode!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise VitloraError(f"--precision must be auto, fp32, bf16 or fp16, not {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise VitloraError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise VitloraError(f"{_flag(f.name)} must be a finite number, not {value}")
        for ok, message in self._range_checks():
            if not ok:
                raise VitloraError(message)
        self._check_choices()
        unknown = [t for t in self.targets if t not in SEMANTIC_TARGETS]
        if not self.targets or unknown:
            raise VitloraError(
                f"unknown --targets {', '.join(unknown) or '(empty)'}: choose from {', '.join(SEMANTIC_TARGETS)}"
            )

    def _check_choices(self) -> None:
        """The training-recipe settings: known names, and nothing extend mode cannot honour."""
        from .tracking import parse_report_to

        for name, choices in (("method", METHODS), ("augment", AUGMENT_POLICIES), ("class_weights", ("none", "auto"))):
            if getattr(self, name) not in choices:
                raise VitloraError(f"{_flag(name)} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")
        own_loss = self.resolved_mode == "extend" or bool(self.negatives)  # the mode's hook computes the loss
        if own_loss and (self.mixup or self.cutmix):
            raise VitloraError("--mixup and --cutmix are for replace mode without --negatives (that loss needs hard "
                               "labels)")
        if own_loss and self.class_weights != "none":
            raise VitloraError("--class-weights is for replace mode without --negatives (that loss balances itself)")
        if (self.augment != "basic" or self.mixup or self.cutmix or self.random_erasing) and not find_spec("kornia"):
            raise VitloraError("--augment trivial/randaugment, --mixup, --cutmix and --random-erasing need kornia: "
                               "pip install 'vitlora[augment]'")
        self.report_to = parse_report_to(self.report_to)  # unknown name / missing extra: stop before training

    def _range_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.rank >= 1, "--rank must be at least 1"),
            (self.alpha > 0, "--alpha must be positive"),
            (0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (self.weight_decay >= 0, "--weight-decay must be non-negative"),
            (0.0 <= self.label_smoothing < 1.0, "--label-smoothing must be in [0, 1)"),
            (0.0 <= self.val_split < 1.0, "--val-split must be in [0, 1)"),
            (0.0 < self.aug_scale_min <= 1.0, "--aug-scale-min must be in (0, 1]"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix must be non-negative (0 turns them off)"),
            (0.0 <= self.random_erasing <= 1.0, "--random-erasing must be in [0, 1]"),
            (self.patch_keep is None or 0.0 < self.patch_keep <= 1.0, "--patch-keep must be in (0, 1]"),
            (self.train_size is None or self.train_size == 0 or self.train_size >= 16,
             "--train-size must be 0 (the model's size) or at least 16 pixels"),
            (0.0 <= self.ema < 1.0, "--ema must be in [0, 1) (0 turns it off)"),
            (self.early_stopping is None or self.early_stopping >= 1, "--early-stopping must be at least 1"),
            (self.auto_stop >= 0, "--auto-stop must be non-negative (0 turns it off)"),
            (0.0 <= self.warmup < 1.0, "--warmup must be in [0, 1)"),
            (self.activation_mb > 0, "--activation-mb must be positive"),
            (self.distill >= 0, "--distill must be non-negative"),
            (self.temperature > 0, "--temperature must be positive"),
            (self.target_recall is None or 0 < self.target_recall <= 1, "--target-recall must be in (0, 1]"),
            (self.lora_lr_scale is None or self.lora_lr_scale > 0, "--lora-lr-scale must be positive"),
            (self.lp_steps >= 0, "--lp-steps must be non-negative"),
            (self.lp_lr > 0, "--lp-lr must be positive"),
            (self.row_norm_cap is None or self.row_norm_cap >= 0, "--row-norm-cap must be non-negative"),
            (self.cv_folds == 0 or self.cv_folds >= 2, "--cv-folds must be 0 or at least 2"),
            (self.oe_weight >= 0, "--oe-weight must be non-negative"),
            (0 < self.unknown_keep < 1, "--unknown-keep must be in (0, 1)"),
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config from settings (a file, flags, or an older `vitlora.json`: missing fields take their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise VitloraError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values = dict(values)
        for name, value in list(values.items()):  # list settings also come as "a,b" (flags, config files)
            if isinstance(value, str) and field_kind(name)[0] is list:
                values[name] = parse_targets(value)
        return cls(**check_types(values))


def field_kind(name: str) -> tuple[type, bool]:
    """(int | float | str | bool | list, None allowed?) of a TrainConfig field, from its annotation."""
    annotation = str(next(f.type for f in dataclasses.fields(TrainConfig) if f.name == name))
    optional = annotation.endswith("| None")
    base = annotation.removesuffix("| None").strip()
    return {"int": int, "float": float, "str": str, "bool": bool, "list[str]": list}[base], optional


_KIND_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
               list: "a list of names or a comma-separated string"}


def check_types(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with ints given for float fields made floats; a one-line error for any other mismatch."""
    out = dict(values)
    for name, value in values.items():
        kind, optional = field_kind(name)
        if value is None and optional:
            continue
        ok = {int: isinstance(value, int) and not isinstance(value, bool),
              float: isinstance(value, (int, float)) and not isinstance(value, bool),
              str: isinstance(value, str), bool: isinstance(value, bool),
              list: isinstance(value, list) and all(isinstance(v, str) for v in value)}[kind]
        if not ok:
            raise VitloraError(f"setting {name} must be {_KIND_NAMES[kind]}, not {value!r}")
        if kind is float:
            out[name] = float(value)
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
