"""PatchDropout: fewer tokens in training only, CLS kept, nothing saved, evaluation untouched."""

from __future__ import annotations

import pytest
import torch

from vitlora.errors import VitloraError
from vitlora.patch_dropout import PatchDropout, find_embeddings, kept_tokens

N_PATCHES = 16  # tiny model: 32x32 image, 8x8 patches


def _tiny(tiny_model):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(tiny_model)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    return get_peft_model(model, cfg)


def _encoder_lengths(model) -> list[int]:
    """Record the sequence length entering the first transformer layer on each forward."""
    lengths: list[int] = []
    layer = next(m for m in model.modules() if type(m).__name__ == "ViTLayer")
    layer.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    return lengths


def _pixels(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("keep", [0.75, 0.5, 0.3, 0.01])
def test_train_mode_sequence_is_cls_plus_floor_keep_n(tiny_model, keep: float) -> None:
    model = _lora(_tiny(tiny_model)).train()
    lengths = _encoder_lengths(model)
    PatchDropout(keep, generator=torch.Generator().manual_seed(0)).attach(model)
    model(pixel_values=_pixels()).logits.sum().backward()
    assert lengths == [1 + max(1, int(keep * N_PATCHES))]
    assert kept_tokens(196, 0.75) == 147 and kept_tokens(196, 0.25) == 49 and kept_tokens(10, 0.01) == 1


def test_kept_tokens_are_cls_then_a_sorted_subset(tiny_model) -> None:
    model = _tiny(tiny_model).train()
    emb = find_embeddings(model)
    x = _pixels()
    full = emb(x)  # no hook yet: [B, 1 + N, D], position embeddings added
    PatchDropout(0.5, generator=torch.Generator().manual_seed(1)).attach(model)
    part = emb(x)
    assert part.shape == (4, 1 + 8, full.shape[-1])
    assert torch.equal(part[:, 0], full[:, 0])  # CLS kept, in front
    chosen = []
    for b in range(4):
        rows = [int((full[b, 1:] == tok).all(-1).nonzero()) for tok in part[b, 1:]]
        assert rows == sorted(rows) and len(set(rows)) == 8  # distinct original tokens, original order
        chosen.append(rows)
    assert len({tuple(r) for r in chosen}) > 1  # each image draws its own subset


def test_same_generator_seed_same_tokens(tiny_model) -> None:
    model = _tiny(tiny_model).train()
    x = _pixels()
    outs = []
    for seed in (3, 3, 4):
        pd = PatchDropout(0.5, generator=torch.Generator().manual_seed(seed)).attach(model)
        outs.append(model(pixel_values=x).logits)
        pd.detach()
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_eval_mode_and_disabled_hook_are_bit_identical(tiny_model) -> None:
    x = _pixels(6)
    plain = _lora(_tiny(tiny_model)).eval()
    hooked = _lora(_tiny(tiny_model))
    hooked.load_state_dict(plain.state_dict())
    lengths = _encoder_lengths(hooked)
    pd = PatchDropout(0.25).attach(hooked)
    with torch.no_grad():
        ref = plain(pixel_values=x).logits
        assert torch.equal(hooked.eval()(pixel_values=x).logits, ref)
        hooked.train()
        pd.enabled = False
        assert torch.equal(hooked(pixel_values=x).logits, ref)  # dropout p=0 in the tiny model
        pd.enabled = True
        assert not torch.equal(hooked(pixel_values=x).logits, ref)
    assert lengths == [1 + N_PATCHES, 1 + N_PATCHES, 1 + 4]


def test_keep_one_is_a_no_op(tiny_model) -> None:
    model = _tiny(tiny_model).train()
    x = _pixels()
    ref = model(pixel_values=x).logits
    emb = find_embeddings(model)
    pd = PatchDropout(1.0).attach(model)
    assert not emb._forward_hooks  # nothing registered at all
    assert torch.equal(model(pixel_values=x).logits, ref)
    pd.detach()


def test_state_dict_and_saved_adapter_unchanged(tiny_model, tmp_path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    model = _lora(_tiny(tiny_model))
    keys = list(model.state_dict())
    PatchDropout(0.5).attach(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(pixel_values=_pixels()).logits.sum().backward()
    opt.step()
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "adapter")
    _lora(_tiny(tiny_model)).save_pretrained(tmp_path / "plain")  # never hooked
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in plain.items()}
    reloaded = PeftModel.from_pretrained(_tiny(tiny_model), tmp_path / "adapter").eval()  # plain peft
    assert not find_embeddings(reloaded)._forward_hooks
    x = _pixels()
    with torch.no_grad():
        assert torch.allclose(reloaded(pixel_values=x).logits, model.eval()(pixel_values=x).logits, atol=1e-6)


def test_deit_distillation_token_is_kept() -> None:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(0)
    cfg = DeiTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                     image_size=32, patch_size=8, num_labels=3)
    model = DeiTForImageClassificationWithTeacher(cfg).train()
    emb = find_embeddings(model)
    x = _pixels(2)
    full = emb(x)
    PatchDropout(0.5, generator=torch.Generator().manual_seed(0)).attach(model)
    part = emb(x)
    assert part.shape[1] == 2 + 8 and torch.equal(part[:, :2], full[:, :2])
    assert model(pixel_values=x).logits.shape == (2, 3)


def test_bad_keep_and_unsupported_model_are_user_errors() -> None:
    for keep in (0.0, 1.5, -0.1):
        with pytest.raises(VitloraError, match="--patch-keep"):
            PatchDropout(keep)
    with pytest.raises(VitloraError, match="ViT or DeiT"):
        PatchDropout(0.5).attach(torch.nn.Linear(2, 2))
