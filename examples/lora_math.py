"""LoRA arithmetic, checked with numbers.

Part 1 builds a tiny 5x6 weight and a rank-2 update by hand and shows that
applying the adapter as a side branch gives exactly the same output as
folding it into the weight. Part 2 does the same on DeiT-tiny's first
attention query projection, through PEFT itself, so the formula in
docs/how-lora-works.md is checked against the library vitlora really uses.

Run:  python examples/lora_math.py [--model PATH_OR_HUB_ID]

No network is needed with the default model folder. The checks are exposed as
`toy_example()` and `deit_example(model_path)` so tests/test_lora_math.py can
assert them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_MODEL = "/work/shared/models/deit-tiny-patch16-224"


class ModelUnavailable(RuntimeError):
    """The model folder or hub id could not be loaded; the message is one sentence."""


def _show(name: str, t: torch.Tensor) -> None:
    """Print a small tensor with numpy's compact formatting."""
    with np.printoptions(precision=3, suppress=True, linewidth=100):
        print(f"{name} {tuple(t.shape)}:\n{t.detach().cpu().numpy()}")


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------
# Part 1: a 5x6 toy weight
# ---------------------------------------------------------------------------


def toy_example(verbose: bool = False, seed: int = 0) -> dict[str, float]:
    """LoRA on a hand-made 5x6 weight; returns max absolute differences.

    Shapes follow torch/PEFT: a Linear maps in=6 features to out=5, so its
    weight W is out x in = 5x6, A (lora_A) is r x in = 2x6 and B (lora_B) is
    out x r = 5x2. Keys of the returned dict:

    - ``merged_vs_branch``: |x @ W'.T - (x @ W.T + s * (x @ A.T) @ B.T)|, ~1e-15
    - ``issue_vs_peft_naming``: the issue's ``A_issue @ B_issue`` (A_issue 5x2,
      B_issue 2x6) against PEFT's ``B @ A`` with A_issue = B, B_issue = A; 0
    - ``wrong_scaling``: the same check with the scaling forgotten (s = 1):
      a negative control that must be large
    """
    g = torch.Generator().manual_seed(seed)
    out_f, in_f, r, alpha = 5, 6, 2, 4.0
    s = alpha / r  # the "scaling" PEFT stores per adapter

    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    A = torch.randn(r, in_f, generator=g, dtype=torch.float64)  # lora_A: r x in
    # At initialisation PEFT sets B = 0, so W' = W. Here we pretend training
    # has moved B away from zero, otherwise there would be nothing to see.
    B = torch.randn(out_f, r, generator=g, dtype=torch.float64)  # lora_B: out x r
    delta = s * (B @ A)  # 5x6, rank <= 2
    W_merged = W + delta

    x = torch.randn(3, in_f, generator=g, dtype=torch.float64)  # 3 inputs
    merged = x @ W_merged.T
    branch = x @ W.T + s * (x @ A.T) @ B.T
    wrong = x @ W.T + 1.0 * (x @ A.T) @ B.T

    # The issue writes W' = W + (alpha/r) * A_issue @ B_issue with A_issue 5x2
    # and B_issue 2x6: the same matrices, names swapped.
    A_issue, B_issue = B, A
    issue_delta = s * (A_issue @ B_issue)

    result = {
        "merged_vs_branch": _maxdiff(merged, branch),
        "issue_vs_peft_naming": _maxdiff(issue_delta, delta),
        "wrong_scaling": _maxdiff(merged, wrong),
        "delta_rank": float(torch.linalg.matrix_rank(delta)),
    }
    if verbose:
        print(f"== Part 1: toy Linear(in={in_f}, out={out_f}), r={r}, alpha={alpha:g}, "
              f"scaling alpha/r={s:g}")
        _show("W (frozen)", W)
        _show("A = lora_A (r x in)", A)
        _show("B = lora_B (out x r)", B)
        _show("update (alpha/r) * B @ A", delta)
        _show("W' = W + (alpha/r) * B @ A", W_merged)
        print(f"rank of the update: {int(result['delta_rank'])}")
        print("max |x @ W'.T - (x @ W.T + (alpha/r) * (x @ A.T) @ B.T)| = "
              f"{result['merged_vs_branch']:.2e}")
        print("issue naming (A_issue = B is 5x2, B_issue = A is 2x6): "
              f"max |A_issue @ B_issue - B @ A| * alpha/r = {result['issue_vs_peft_naming']:.2e}")
        print(f"negative control, scaling forgotten (1 instead of {s:g}): "
              f"max diff = {result['wrong_scaling']:.3f}")
    return result


# ---------------------------------------------------------------------------
# Part 2: DeiT-tiny through PEFT
# ---------------------------------------------------------------------------


def query_module_name(model: torch.nn.Module) -> str:
    """The leaf name of the attention query projection for this transformers version.

    transformers 5 calls it ``q_proj``; transformers 4 called it ``query``.
    Looking at the loaded model beats checking version numbers.
    """
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for candidate in ("q_proj", "query"):
        if candidate in leaves:
            return candidate
    raise ModelUnavailable("the model has no attention module named 'q_proj' or 'query'.")


def _looks_like_path(name: str) -> bool:
    """Treat absolute/relative paths as local folders, 'org/name' as a hub id."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def load_model(model_path: str) -> torch.nn.Module:
    """Load an image classifier from a local folder or a hub id, in eval mode."""
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the example's output readable
    path = Path(model_path).expanduser()
    if not path.is_dir() and _looks_like_path(model_path):
        raise ModelUnavailable(f"model folder {model_path} not found; pass --model with a "
                               "local model folder or a Hugging Face hub id.")
    try:
        model = AutoModelForImageClassification.from_pretrained(str(path) if path.is_dir() else model_path)
    except Exception as exc:  # hub offline, unknown id, not an image classifier...
        raise ModelUnavailable(f"could not load model {model_path!r} "
                               f"({type(exc).__name__}); pass --model with a local model "
                               "folder or a reachable Hugging Face hub id.") from exc
    return model.eval()


def deit_example(model_path: str = DEFAULT_MODEL, verbose: bool = False,
                 seed: int = 0) -> dict[str, Any]:
    """Check W' = W + (alpha/r) * B @ A on a real ViT through PEFT.

    Wraps the model with LoRA (r=4, alpha=8) on the query projections, makes
    the first layer's lora_B non-zero (seeded), and returns max absolute
    differences:

    - ``module_vs_formula``: PEFT module forward vs F.linear(x, W + s*B@A, bias)
    - ``merged_weight_vs_formula``: Linear weight after merge_and_unload vs W + s*B@A
    - ``logits_merged_vs_adapter``: full-model logits, adapter vs merged
    - ``wrong_scaling``: module forward vs F.linear with s = 1 (negative control)
    - ``logits_adapter_vs_base``: how much the adapter changed the logits at all
      (shows the other checks are not comparing the base model with itself)
    plus parameter counts and the target module name.
    """
    from peft import LoraConfig, get_peft_model

    # peft 0.21 calls a transformers API that transformers 5 deprecated; the
    # warning is about the libraries, not this example.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.manual_seed(seed)
    model = load_model(model_path)
    target = query_module_name(model)
    r, alpha = 4, 8
    size = model.config.image_size
    pixels = torch.randn(2, model.config.num_channels, size, size)

    with torch.no_grad():
        logits_base = model(pixel_values=pixels).logits

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=[target]))
    peft_model.eval()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())

    # The first LoRA-wrapped module in module order is layer 0's query.
    name, lora_layer = next((n, m) for n, m in peft_model.named_modules()
                            if hasattr(m, "lora_B") and n.endswith(target))
    adapter = "default"
    with torch.no_grad():
        lora_B = lora_layer.lora_B[adapter].weight
        # Scale 0.05: the order of magnitude trained lora_B values reach.
        lora_B.copy_(torch.randn(lora_B.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)

        W = lora_layer.base_layer.weight.detach().clone()
        bias = lora_layer.base_layer.bias.detach().clone()
        A = lora_layer.lora_A[adapter].weight.detach().clone()
        B = lora_B.detach().clone()
        s = lora_layer.scaling[adapter]
        W_merged = W + s * (B @ A)

        x = torch.randn(2, 197, W.shape[1])
        y_peft = lora_layer(x)
        y_formula = F.linear(x, W_merged, bias)
        y_wrong = F.linear(x, W + 1.0 * (B @ A), bias)

        logits_adapter = peft_model(pixel_values=pixels).logits

        merged_model = peft_model.merge_and_unload()
        merged_linear = merged_model.get_submodule(name.removeprefix("base_model.model."))
        logits_merged = merged_model(pixel_values=pixels).logits

    result: dict[str, Any] = {
        "target_module": target,
        "layer": name.removeprefix("base_model.model."),
        "scaling": float(s),
        "shapes": {"W": tuple(W.shape), "A": tuple(A.shape), "B": tuple(B.shape)},
        "trainable_params": trainable,
        "total_params": total,
        "module_vs_formula": _maxdiff(y_peft, y_formula),
        "merged_weight_vs_formula": _maxdiff(merged_linear.weight, W_merged),
        "merged_is_plain_linear": type(merged_linear) is torch.nn.Linear,
        "logits_merged_vs_adapter": _maxdiff(logits_merged, logits_adapter),
        "logits_adapter_vs_base": _maxdiff(logits_adapter, logits_base),
        "wrong_scaling": _maxdiff(y_peft, y_wrong),
    }
    if verbose:
        sh = result["shapes"]
        print(f"\n== Part 2: {model_path}")
        print(f"target_modules=[{target!r}], r={r}, lora_alpha={alpha}, scaling={s:g}")
        print(f"trainable params: {trainable:,} of {total:,} "
              f"({100 * trainable / total:.2f}%; query LoRA only, no classifier head)")
        print(f"{result['layer']}: W {sh['W']}, lora_A {sh['A']}, lora_B {sh['B']}")
        print("(a) max |PEFT module(x) - F.linear(x, W + s*B@A, bias)|  = "
              f"{result['module_vs_formula']:.2e}")
        print("(b) max |merged Linear.weight - (W + s*B@A)|           = "
              f"{result['merged_weight_vs_formula']:.2e}  "
              f"(plain nn.Linear after merge: {result['merged_is_plain_linear']})")
        print("(c) max |logits merged - logits with adapter|          = "
              f"{result['logits_merged_vs_adapter']:.2e}")
        print("    max |logits with adapter - base model logits|      = "
              f"{result['logits_adapter_vs_base']:.2e}  (the adapter does change the model)")
        print(f"negative control, scaling 1 instead of {s:g}: max diff = "
              f"{result['wrong_scaling']:.3f}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"local model folder or hub id (default: {DEFAULT_MODEL})")
    args = parser.parse_args(argv)
    # Fail before printing anything when a local folder is plainly missing.
    if _looks_like_path(args.model) and not Path(args.model).expanduser().is_dir():
        print(f"lora_math: model folder {args.model} not found; pass --model with a local "
              "model folder or a Hugging Face hub id.", file=sys.stderr)
        return 2
    toy_example(verbose=True)
    try:
        deit_example(args.model, verbose=True)
    except ModelUnavailable as exc:
        print(f"lora_math: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
