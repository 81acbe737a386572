"""Head surgery, label matching and LoRA target resolution on real transformers models."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from vitlora.errors import VitloraError
from vitlora.surgery import extend_head, match_labels, normalize_label, replace_head
from vitlora.targets import resolve_targets


def tiny(labels=("tench", "goldfish", "Red_Fox", "tabby, tabby cat")) -> ViTForImageClassification:
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=len(labels), id2label=dict(enumerate(labels)))
    return ViTForImageClassification(cfg).eval()


def test_normalize_and_match_labels():
    assert normalize_label("Red_Fox") == normalize_label("red fox") == normalize_label("red-fox") == "redfox"
    base = ["tench", "Red_Fox", "tabby, tabby cat"]
    assert match_labels(["red fox", "RACCOON", "Tabby Cat", "tench"], base) == {"red fox": 1, "Tabby Cat": 2,
                                                                               "tench": 0}


def test_extend_keeps_old_rows_exactly_and_inits_new_rows():
    model = tiny()
    old_w = model.classifier.weight.detach().clone()
    old_b = model.classifier.bias.detach().clone()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(pixel_values=x).logits
    change = extend_head(model, ["raccoon", "red-fox", "otter"])
    assert change.new_labels == ["raccoon", "otter"]
    assert change.matched == {"red-fox": "Red_Fox"}
    assert change.labels == ["tench", "goldfish", "Red_Fox", "tabby, tabby cat", "raccoon", "otter"]
    assert change.data_label2id() == {"red-fox": 2, "raccoon": 4, "otter": 5}
    w, b = model.classifier.weight.detach(), model.classifier.bias.detach()
    assert w.shape == (6, 32)
    assert torch.equal(w[:4], old_w) and torch.equal(b[:4], old_b)
    assert torch.equal(b[4:], torch.zeros(2))
    assert 0.005 < w[4:].std().item() < 0.05  # normal(0, 0.02)
    assert model.config.num_labels == 6 and model.config.id2label[5] == "otter"
    assert model.config.label2id["raccoon"] == 4
    with torch.no_grad():
        after = model(pixel_values=x).logits
    assert torch.allclose(after[:, :4], before, atol=1e-6)  # old classes' logits unchanged


def test_extend_with_given_rows():
    model = tiny()
    rows = torch.full((1, 32), 0.5)
    extend_head(model, ["raccoon"], init_rows=rows, init_bias=torch.tensor([-1.0]))
    assert torch.equal(model.classifier.weight[4].detach(), rows[0])
    assert model.classifier.bias[4].item() == -1.0


def test_replace_reuses_matching_base_rows():
    model = tiny()
    old_w = model.classifier.weight.detach().clone()
    change = replace_head(model, ["goldfish", "zebra", "red fox"])
    assert change.labels == ["goldfish", "zebra", "red fox"]
    assert change.matched == {"goldfish": "goldfish", "red fox": "Red_Fox"}
    assert change.new_labels == ["zebra"]
    w = model.classifier.weight.detach()
    assert torch.equal(w[0], old_w[1]) and torch.equal(w[2], old_w[2])
    assert model.config.id2label == {0: "goldfish", 1: "zebra", 2: "red fox"}
    assert change.data_label2id() == {"goldfish": 0, "zebra": 1, "red fox": 2}


def test_replace_needs_two_classes():
    with pytest.raises(VitloraError, match="at least 2 classes"):
        replace_head(tiny(), ["cat"])


def test_resolve_targets_transformers5_vit():
    model = tiny()
    assert resolve_targets(model, ["query", "value"], "classifier") == ["q_proj", "v_proj"]
    assert resolve_targets(model, ["key", "output", "mlp"], "classifier") == ["k_proj", "o_proj", "fc1", "fc2"]


def test_resolve_targets_transformers4_style_names():
    """transformers 4 named ViT's modules query/value and both outputs `output.dense`."""
    from torch import nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.Module()
            self.attention.query, self.attention.key, self.attention.value = (nn.Linear(4, 4) for _ in range(3))
            self.output = nn.Module()
            self.output.dense = nn.Linear(4, 4)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attn()
            self.intermediate = nn.Module()
            self.intermediate.dense = nn.Linear(4, 8)
            self.output = nn.Module()
            self.output.dense = nn.Linear(8, 4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([Layer(), Layer()])
            self.classifier = nn.Linear(4, 3)

    m = Model()
    assert resolve_targets(m, ["query", "value"], "classifier") == ["query", "value"]
    out = resolve_targets(m, ["output"], "classifier")
    assert out == ["layer.0.attention.output.dense", "layer.1.attention.output.dense"]
    mlp = resolve_targets(m, ["mlp"], "classifier")
    assert sorted(mlp) == sorted(["layer.0.intermediate.dense", "layer.0.output.dense",
                                  "layer.1.intermediate.dense", "layer.1.output.dense"])


def test_unmatched_target_lists_what_the_model_has():
    from torch import nn

    class ConvOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in = nn.Linear(4, 4)
            self.classifier = nn.Linear(4, 2)

    with pytest.raises(VitloraError, match="query not found.*proj_in"):
        resolve_targets(ConvOnly(), ["query"], "classifier")
