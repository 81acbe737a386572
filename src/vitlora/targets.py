"""Resolve semantic LoRA targets (query, key, value, output, mlp) to module names.

Module names differ by architecture and by transformers version: ViT's query projection
is `q_proj` in transformers 5 and `attention.attention.query` in 4; Swin, BEiT, ConvNext
and others differ again. Users say what they mean and we find it in the loaded model.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import VitloraError

# Leaf-name patterns per semantic target. `output` and `mlp` also look at the parent
# path, because transformers-4 ViT names both the attention output and the MLP output
# `output.dense`.
_LEAF = {
    "query": re.compile(r"^(q_proj|query|q|q_lin|to_q)$"),
    "key": re.compile(r"^(k_proj|key|k|k_lin|to_k)$"),
    "value": re.compile(r"^(v_proj|value|v|v_lin|to_v)$"),
    "output": re.compile(r"^(o_proj|out_proj|out_lin|to_out|proj|dense)$"),
    "mlp": re.compile(r"^(fc1|fc2|dense|lin1|lin2|up_proj|down_proj|gate_proj|c_fc|c_proj)$"),
}
_ATTENTION_PARENT = re.compile(r"(^|\.)(attention|attn|self_attn|self_attention|attention\.output)(\.|$)")
_MLP_PARENT = re.compile(r"(^|\.)(mlp|ffn|intermediate|feed_forward)(\.|$)|(^|\.)output$")


def linear_modules(model: nn.Module, head: str | None = None) -> list[str]:
    """Names of every Linear layer outside the classification head."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if head and (name == head or name.startswith(head + ".") or name.endswith("." + head)):
            continue
        names.append(name)
    return names


def _classify(name: str) -> str | None:
    parent, _, leaf = name.rpartition(".")
    for target in ("query", "key", "value"):
        if _LEAF[target].match(leaf):
            return target
    in_attention = bool(_ATTENTION_PARENT.search(parent))
    if in_attention and (leaf != "dense" and _LEAF["output"].match(leaf) or parent.endswith("attention.output")):
        return "output"
    if not in_attention and _LEAF["mlp"].match(leaf) and (leaf in ("fc1", "fc2") or _MLP_PARENT.search(parent)):
        return "mlp"
    return None


def resolve_targets(model: nn.Module, targets: list[str], head: str | None = None) -> list[str]:
    """Map semantic names to the shortest unambiguous module-name suffixes PEFT accepts.

    Raises VitloraError listing what the model has when a target matches nothing.
    """
    found: dict[str, list[str]] = {t: [] for t in targets}
    all_linear = linear_modules(model, head)
    for name in all_linear:
        kind = _classify(name)
        if kind in found:
            found[kind].append(name)
    missing = [t for t, names in found.items() if not names]
    if missing:
        leaves = sorted({n.rpartition(".")[2] for n in all_linear})
        raise VitloraError(
            f"--targets {', '.join(missing)} not found in {type(model).__name__}; "
            f"its linear layers are named: {', '.join(leaves)}"
        )
    chosen: list[str] = []
    for target in targets:
        names = found[target]
        leaves = sorted({n.rpartition(".")[2] for n in names})
        # a leaf suffix is usable only if it selects exactly these modules and no others
        selected = [n for n in all_linear if n.rpartition(".")[2] in leaves]
        if sorted(selected) == sorted(names):
            chosen.extend(leaf for leaf in leaves if leaf not in chosen)
        else:
            chosen.extend(n for n in names if n not in chosen)
    return chosen
