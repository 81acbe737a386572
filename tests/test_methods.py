"""`--method lora|dora|rslora|loha|lokr`: each trains, reloads with plain peft and merges to the same predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitlora.cli import main

FAST = ["--epochs", "2", "--batch-size", "8", "--lr", "5e-3", "--quiet", "--rank", "4", "--alpha", "8",
        "--val-split", "0.25", "--precision", "fp32"]
# what each method must leave in adapter_config.json for plain peft to rebuild it
EXPECTED = {
    "dora": {"peft_type": "LORA", "use_dora": True, "use_rslora": False},
    "rslora": {"peft_type": "LORA", "use_dora": False, "use_rslora": True},
    "loha": {"peft_type": "LOHA"},
    "lokr": {"peft_type": "LOKR"},
}


def _pixels(run, folder: Path) -> torch.Tensor:
    from PIL import Image

    from vitlora.data import normalize, resize_for_eval

    files = [f for colour in ("red", "green", "blue") for f in sorted((folder / colour).iterdir())[:3]]
    return normalize(torch.stack([resize_for_eval(Image.open(f).convert("RGB"), run.preprocess) for f in files]),
                     run.preprocess)


@pytest.mark.parametrize("method", list(EXPECTED))
def test_method_reloads_with_plain_peft_and_merges(method: str, tiny_model: Path, colour_folder: Path,
                                                   tmp_path: Path, quiet_env) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    import vitlora

    out = tmp_path / method
    assert main(["train", str(colour_folder), "--model", str(tiny_model), "--out", str(out), "--method", method,
                 *FAST]) == 0
    assert json.loads((out / "vitlora.json").read_text())["config"]["method"] == method
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert {k: adapter.get(k) for k in EXPECTED[method]} == EXPECTED[method]
    assert adapter["modules_to_save"] == ["classifier"]

    labels = json.loads((out / "labels.json").read_text())
    id2label = {int(k): v for k, v in labels["id2label"].items()}
    base = AutoModelForImageClassification.from_pretrained(
        tiny_model, num_labels=len(id2label), id2label=id2label, label2id=labels["label2id"],
        ignore_mismatched_sizes=True)
    plain = PeftModel.from_pretrained(base, out).eval()  # plain peft, no vitlora
    run = vitlora.load(out, merge=False)
    x = _pixels(run, colour_folder)
    with torch.no_grad():
        ref = plain(pixel_values=x).logits
    assert torch.allclose(run.logits(x), ref, atol=1e-5)
    assert torch.allclose(vitlora.load(out, merge=True).logits(x), ref, atol=1e-4)

    merged_dir = tmp_path / f"{method}-merged"
    assert main(["merge", str(out), str(merged_dir)]) == 0
    merged = AutoModelForImageClassification.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        assert torch.allclose(merged(pixel_values=x).logits, ref, atol=1e-4)
    # the method's own weights were trained: merging them changed the encoder's query projection
    base_sd = AutoModelForImageClassification.from_pretrained(tiny_model).state_dict()
    query = [k for k in base_sd if k.endswith("q_proj.weight")]
    assert query and all(not torch.allclose(merged.state_dict()[k], base_sd[k]) for k in query)


def test_dora_is_not_merged_by_the_plain_lora_shortcut(tmp_path: Path) -> None:
    """vitlora's PEFT-free merge only takes vanilla LoRA; DoRA / LoHa / LoKr go through peft's own merge."""
    from torch import nn

    from vitlora.lora import merge_adapter_fast

    for cfg in ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}, {"peft_type": "LOHA", "r": 4}):
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        (tmp_path / "adapter_model.safetensors").write_bytes(b"")
        model = nn.Linear(2, 2)
        before = model.weight.detach().clone()
        assert merge_adapter_fast(model, tmp_path) is False
        assert torch.equal(model.weight, before)


def test_unknown_method_is_one_line_error(tiny_model: Path, colour_folder: Path, tmp_path: Path, capsys,
                                          quiet_env) -> None:
    assert main(["train", str(colour_folder), "--model", str(tiny_model), "--out", str(tmp_path / "x"),
                 "--method", "ia3", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--method must be one of lora, dora, rslora, loha, lokr, not 'ia3'")
