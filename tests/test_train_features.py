"""Training-recipe flags through `vitlora train` on the tiny model: augmentation, PatchDropout, EMA, imbalance.

Every run must still be a plain peft adapter (reloads with `PeftModel.from_pretrained`, merges to the same
logits), record its settings in vitlora.json, and keep on disk the weights its metrics.json calls best.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_colour_images, plain_peft_model
from vitlora.cli import main

FAST = ["--epochs", "3", "--batch-size", "8", "--lr", "5e-3", "--quiet", "--rank", "4", "--alpha", "8",
        "--val-split", "0.25", "--precision", "fp32"]


def train(tiny_model: Path, data: Path, out: Path, *flags: str) -> dict:
    # --no-calibrate: these tests compare the saved adapter with the epoch's recorded validation loss,
    # which a temperature folded into the head afterwards (vitlora.calibration) would change
    assert main(["train", str(data), "--model", str(tiny_model), "--out", str(out), *FAST, "--no-calibrate",
                 *flags]) == 0
    return json.loads((out / "metrics.json").read_text())


def held_out(data: Path, tmp: Path) -> Path:
    """The run's validation photos (seed 0, 25 %) as an ImageFolder, for `vitlora eval`."""
    from vitlora.data import discover, stratified_split

    _, val_samples = stratified_split(discover(str(data)).samples, 0.25, 0)
    for sample in val_samples:
        (tmp / sample.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.path, tmp / sample.label / Path(sample.path).name)
    return tmp


def assert_plain_peft_and_merge_agree(out: Path, tiny_model: Path, data: Path) -> None:
    from PIL import Image

    import vitlora
    from vitlora.data import normalize, resize_for_eval

    plain = plain_peft_model(tiny_model, out)
    merged = vitlora.load(out, merge=True)
    files = sorted(p for p in data.rglob("*") if p.is_file())[::4]
    x = normalize(torch.stack([resize_for_eval(Image.open(f).convert("RGB"), merged.preprocess) for f in files]),
                  merged.preprocess)
    with torch.no_grad():
        assert torch.allclose(merged.logits(x), plain(pixel_values=x).logits, atol=1e-4)


def assert_best_epoch_on_disk(out: Path, data: Path, tmp: Path, metrics: dict) -> None:
    """`vitlora eval` of the saved run on its validation photos gives the best epoch's recorded loss
    (the run was trained with --no-calibrate: no temperature folded into the head afterwards)."""
    best = next(e for e in metrics["epochs"] if e["epoch"] == metrics["best_epoch"])
    report = tmp / "eval.json"
    assert main(["eval", str(out), str(held_out(data, tmp / "val")), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["nll"] == pytest.approx(best["val_loss"], abs=1e-4)


@pytest.fixture(scope="module")
def default_run(tiny_model, colour_folder, tmp_path_factory) -> dict:
    return train(tiny_model, colour_folder, tmp_path_factory.mktemp("default") / "run")


# ---- augmentation -----------------------------------------------------------------------------------------


def test_augment_policy_mixup_cutmix_erasing_train_and_reload(tiny_model, colour_folder, tmp_path, default_run,
                                                              quiet_env):
    out = tmp_path / "aug"
    flags = ["--augment", "trivial", "--mixup", "0.8", "--cutmix", "1.0", "--random-erasing", "0.25"]
    metrics = train(tiny_model, colour_folder, out, *flags)
    config = json.loads((out / "vitlora.json").read_text())["config"]
    assert (config["augment"], config["mixup"], config["cutmix"], config["random_erasing"]) == (
        "trivial", 0.8, 1.0, 0.25)
    # mixed soft targets cost more loss than the default's hard ones on the same photos
    assert [e["train_loss"] for e in metrics["epochs"]] != [e["train_loss"] for e in default_run["epochs"]]
    assert metrics["epochs"][-1]["train_loss"] > default_run["epochs"][-1]["train_loss"]
    assert_plain_peft_and_merge_agree(out, tiny_model, colour_folder)
    assert_best_epoch_on_disk(out, colour_folder, tmp_path, metrics)


def test_randaugment_trains(tiny_model, colour_folder, tmp_path, quiet_env):
    metrics = train(tiny_model, colour_folder, tmp_path / "ra", "--augment", "randaugment", "--epochs", "1")
    assert metrics["epochs"][0]["train_loss"] > 0


def test_mixup_is_refused_in_extend_mode(tiny_model, red_folder, tmp_path, capsys, quiet_env):
    assert main(["train", str(red_folder), "--label", "red", "--model", str(tiny_model),
                 "--out", str(tmp_path / "x"), "--mixup", "0.2", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--mixup and --cutmix are for replace mode without --negatives (that loss needs hard "
                            "labels)")


def test_mixup_and_class_weights_are_refused_with_replace_mode_negatives(tiny_model, colour_folder, red_folder,
                                                                         tmp_path, capsys, quiet_env):
    for flags in (["--mixup", "0.2"], ["--class-weights", "auto"]):
        assert main(["train", str(colour_folder), "--negatives", str(red_folder), "--model", str(tiny_model),
                     "--out", str(tmp_path / "x"), *flags, *FAST]) == 2
        assert "for replace mode without --negatives" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unknown_augment_policy_is_one_line_error(tiny_model, colour_folder, tmp_path, capsys, quiet_env):
    assert main(["train", str(colour_folder), "--model", str(tiny_model), "--out", str(tmp_path / "x"),
                 "--augment", "autoaugment", *FAST]) == 2
    assert "--augment must be one of basic, trivial, randaugment" in capsys.readouterr().err


# ---- PatchDropout -----------------------------------------------------------------------------------------


def test_patch_keep_trains_on_fewer_tokens_and_evaluates_on_all(tiny_model, colour_folder, tmp_path, default_run,
                                                                quiet_env):
    out = tmp_path / "pd"
    metrics = train(tiny_model, colour_folder, out, "--patch-keep", "0.5")
    assert json.loads((out / "vitlora.json").read_text())["config"]["patch_keep"] == 0.5
    assert [e["train_loss"] for e in metrics["epochs"]] != [e["train_loss"] for e in default_run["epochs"]]
    # validation ran on all tokens: `vitlora eval` (no hook at all) reproduces the recorded loss
    assert_best_epoch_on_disk(out, colour_folder, tmp_path, metrics)
    assert_plain_peft_and_merge_agree(out, tiny_model, colour_folder)


# ---- --train-size ------------------------------------------------------------------------------------------


@pytest.fixture
def input_sides(monkeypatch):
    """Records (training?, side) of every image the ViT patch embedding sees."""
    from transformers.models.vit.modeling_vit import ViTPatchEmbeddings

    seen: list[tuple[bool, int]] = []
    forward = ViTPatchEmbeddings.forward

    def spy(self, pixel_values, *args, **kwargs):
        seen.append((self.training, int(pixel_values.shape[-1])))
        return forward(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(ViTPatchEmbeddings, "forward", spy)
    return seen


def test_train_size_trains_on_smaller_crops_and_evaluates_at_full_size(tiny_model, colour_folder, tmp_path,
                                                                      default_run, input_sides, quiet_env):
    out = tmp_path / "small"
    metrics = train(tiny_model, colour_folder, out, "--train-size", "16")  # the tiny model takes 32 px
    assert json.loads((out / "vitlora.json").read_text())["config"]["train_size"] == 16
    assert {side for training, side in input_sides if training} == {16}
    assert {side for training, side in input_sides if not training} == {32}
    assert [e["train_loss"] for e in metrics["epochs"]] != [e["train_loss"] for e in default_run["epochs"]]
    assert_best_epoch_on_disk(out, colour_folder, tmp_path, metrics)  # validation was at the model's size
    assert_plain_peft_and_merge_agree(out, tiny_model, colour_folder)


@pytest.fixture
def layer_tokens(monkeypatch):
    """Records (training?, sequence length) of every input to a ViT encoder layer."""
    from transformers.models.vit.modeling_vit import ViTLayer

    seen: list[tuple[bool, int]] = []
    forward = ViTLayer.forward

    def spy(self, hidden_states, *args, **kwargs):
        seen.append((self.training, int(hidden_states.shape[1])))
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(ViTLayer, "forward", spy)
    return seen


def _lengths(seen: list[tuple[bool, int]], training: bool) -> set[int]:
    return {n for t, n in seen if t == training}


def test_default_train_size_and_patch_keep(tiny_model, colour_folder, red_folder, tmp_path, input_sides,
                                           layer_tokens, quiet_env, capsys):
    # the tiny model takes 32 px with 8-px patches (16 + CLS tokens): 5/7 of 32 rounds to 3 patches, 24 px
    # (9 + CLS tokens); PatchDropout's default keep 0.5 leaves 4 of those 9 in a first extension
    train(tiny_model, colour_folder, tmp_path / "auto")
    assert {side for training, side in input_sides if training} == {24}
    assert _lengths(layer_tokens, True) == {10}  # replace mode keeps every token (keep 0.5 cost breed accuracy)
    err = capsys.readouterr().err
    assert "training crops of 24 px" in err and "PatchDropout" not in err
    input_sides.clear()
    layer_tokens.clear()
    train(tiny_model, colour_folder, tmp_path / "off", "--train-size", "0")
    assert {side for training, side in input_sides} == {32}
    assert "training crops" not in capsys.readouterr().err
    input_sides.clear()  # extend mode with negatives measured a small loss at 160 px: the model's size
    assert main(["train", str(red_folder), "--label", "red", "--negatives", str(colour_folder / "green"),
                 "--model", str(tiny_model), "--out", str(tmp_path / "extend"), *FAST]) == 0
    assert {side for training, side in input_sides} == {32}
    input_sides.clear()  # positives only it held recall and false positives: smaller crops, half their tokens
    layer_tokens.clear()
    assert main(["train", str(red_folder), "--label", "red", "--model", str(tiny_model), "--out",
                 str(tmp_path / "extend-positives"), *FAST]) == 0
    assert {side for training, side in input_sides if training} == {24}
    assert {side for training, side in input_sides if not training} == {32}
    assert _lengths(layer_tokens, True) == {5} and _lengths(layer_tokens, False) == {17}
    assert "each training image keeps 50% of its patch tokens (PatchDropout)" in capsys.readouterr().err
    assert json.loads((tmp_path / "extend-positives" / "vitlora.json").read_text())["config"]["patch_keep"] is None
    epochs = json.loads((tmp_path / "extend-positives" / "metrics.json").read_text())["epochs"]
    assert {(e["train_px"], e["patch_keep"]) for e in epochs} == {(24, 0.5)}  # what the defaults chose
    layer_tokens.clear()  # --patch-keep 1 turns the default off
    assert main(["train", str(red_folder), "--label", "red", "--model", str(tiny_model), "--out",
                 str(tmp_path / "extend-all-tokens"), *FAST, "--patch-keep", "1"]) == 0
    assert _lengths(layer_tokens, True) == {10}
    layer_tokens.clear()  # several classes added at once: not measured equal (ImageNet top-1 fell), all tokens
    assert main(["train", str(colour_folder), "--mode", "extend", "--model", str(tiny_model), "--out",
                 str(tmp_path / "extend-three"), *FAST]) == 0
    assert _lengths(layer_tokens, True) == {10}
    input_sides.clear()  # a step stacked on an extended run: 160 px lost recall and ImageNet top-1 there
    layer_tokens.clear()
    make_colour_images(tmp_path / "blue", "blue", 12, seed=21)
    assert main(["train", str(tmp_path / "blue"), "--label", "blue", "--model", str(tmp_path / "extend"), "--out",
                 str(tmp_path / "stacked"), *FAST]) == 0
    assert {side for training, side in input_sides} == {32}
    assert _lengths(layer_tokens, True) == {17}


def test_train_size_in_extend_mode_with_negatives(tiny_model, red_folder, colour_folder, tmp_path, input_sides,
                                                  quiet_env):
    # the negatives join each batch: they are resized to the training crops' side too
    out = tmp_path / "extend"
    assert main(["train", str(red_folder), "--label", "red", "--negatives", str(colour_folder / "green"),
                 "--model", str(tiny_model), "--out", str(out), *FAST, "--train-size", "24",
                 "--patch-keep", "0.5"]) == 0
    assert {side for training, side in input_sides if training} == {24}
    assert {side for training, side in input_sides if not training} == {32}
    assert_plain_peft_and_merge_agree(out, tiny_model, red_folder)


def test_replace_mode_imprints_from_a_bounded_sample_extend_mode_from_every_positive(
        tiny_model, colour_folder, red_folder, tmp_path, monkeypatch, quiet_env):
    # the base's pass over every training photo for the new rows' class means cost a 5-epoch cat-breed run
    # 10.7 of its 136.5 s; replace mode needs only the means, extend mode every positive's distillation target
    import vitlora.heads as heads
    import vitlora.training as training

    monkeypatch.setattr(training, "IMPRINT_PER_LABEL", 5)
    seen, real = [], heads.base_outputs
    monkeypatch.setattr(heads, "base_outputs", lambda m, name, cache, *a, **k: seen.append(cache.labels.clone())
                        or real(m, name, cache, *a, **k))
    train(tiny_model, colour_folder, tmp_path / "replace")  # 12 training photos of each of 3 colours
    assert torch.bincount(seen[0]).tolist() == [5, 5, 5]
    seen.clear()
    assert main(["train", str(red_folder), "--label", "red", "--model", str(tiny_model), "--out",
                 str(tmp_path / "extend"), *FAST]) == 0
    assert len(seen[0]) == 12  # all 16 less the 25 % held out


@pytest.mark.parametrize("size, message", [
    ("20", "--train-size must be a multiple of the patch size 8, not 20"),
    ("8", "--train-size must be 0 (the model's size) or at least 16 pixels"),
])
def test_train_size_refusals(tiny_model, colour_folder, tmp_path, capsys, quiet_env, size, message):
    assert main(["train", str(colour_folder), "--model", str(tiny_model), "--out", str(tmp_path / "x"),
                 "--train-size", size, *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "adapter_model.safetensors").exists()


def test_train_size_needs_a_model_that_interpolates_position_embeddings():
    from types import SimpleNamespace

    from vitlora.errors import VitloraError
    from vitlora.train_size import forward_kwargs, training_size

    class Convnet(torch.nn.Module):
        config = SimpleNamespace(patch_size=None)

        def forward(self, pixel_values):
            return pixel_values

    class Vit(Convnet):
        config = SimpleNamespace(patch_size=16)

        def forward(self, pixel_values, interpolate_pos_encoding=False):
            return pixel_values

    pp = SimpleNamespace(height=224, width=224)
    assert training_size(Convnet(), None, pp) is None and training_size(Convnet(), 224, pp) is None
    with pytest.raises(VitloraError, match="--train-size needs a ViT / DeiT-style model; Convnet"):
        training_size(Convnet(), 160, pp)
    assert training_size(Vit(), None, pp) == (160, 160) and training_size(Vit(), 0, pp) is None
    assert training_size(Vit(), None, SimpleNamespace(height=384, width=384)) == (272, 272)
    assert training_size(Vit(), None, SimpleNamespace(height=224, width=256)) is None  # not square: as it is
    assert training_size(Vit(), 192, pp) == (192, 192)
    assert forward_kwargs(None) == {} and forward_kwargs((160, 160)) == {"interpolate_pos_encoding": True}


def test_patch_keep_out_of_range_is_refused(tiny_model, colour_folder, tmp_path, capsys, quiet_env):
    assert main(["train", str(colour_folder), "--model", str(tiny_model), "--out", str(tmp_path / "x"),
                 "--patch-keep", "0", *FAST]) == 2
    assert "--patch-keep must be in (0, 1]" in capsys.readouterr().err


# ---- EMA --------------------------------------------------------------------------------------------------


def test_ema_is_evaluated_each_epoch_and_the_better_weights_are_kept(tiny_model, colour_folder, tmp_path,
                                                                     quiet_env, monkeypatch):
    out = tmp_path / "ema"
    monkeypatch.setenv("VITLORA_THREADS", "1")  # one thread: the same float sums every time
    # a far too high learning rate makes the raw weights jump around, which the average smooths
    # (at the full 32 px: at the default 24-px crops both sets of weights reach a loss of 0 on these colours)
    metrics = train(tiny_model, colour_folder, out, "--ema", "0.9", "--lr", "2", "--epochs", "4", "--train-size", "0")
    for e in metrics["epochs"]:
        assert e["weights"] in ("ema", "raw")
        raw, ema = e["raw_val"], e["ema_val"]
        assert set(raw) == set(ema) >= {"val_loss", "val_accuracy"}
        assert raw != ema  # two different sets of weights were scored
        better = "ema" if (ema["val_accuracy"], -ema["val_loss"]) > (raw["val_accuracy"], -raw["val_loss"]) \
            else "raw"
        assert e["weights"] == better
        kept = ema if better == "ema" else raw
        assert (e["val_accuracy"], e["val_loss"]) == (kept["val_accuracy"], kept["val_loss"])
    assert "ema" in [e["weights"] for e in metrics["epochs"]]
    assert_best_epoch_on_disk(out, colour_folder, tmp_path, metrics)  # the adapter saved is the kept one
    assert_plain_peft_and_merge_agree(out, tiny_model, colour_folder)


def test_ema_averages_and_restores_the_raw_weights():
    from vitlora.recipe import Ema

    model = torch.nn.Linear(2, 1)
    model.bias.requires_grad_(False)
    ema = Ema(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # first update: decay min(0.5, 2/11) = 2/11
    expected = start + (1 - 2 / 11) * 1.0
    assert torch.allclose(ema.shadow[0], expected)
    with ema.applied():
        assert torch.allclose(model.weight, expected)
    assert torch.allclose(model.weight, start + 1.0)
    assert len(ema.shadow) == 1  # only trainable tensors are averaged


# ---- imbalance --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imbalanced_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imbalanced")
    for j, (colour, n) in enumerate({"red": 24, "green": 8, "blue": 4}.items()):
        make_colour_images(root / colour, colour, n, seed=20 + j)
    return root


def test_inverse_frequency_weights_give_every_image_mean_weight_one():
    from vitlora.recipe import inverse_frequency_weights

    labels = torch.tensor([0] * 24 + [1] * 8 + [3] * 4)
    w = inverse_frequency_weights(labels, 4)
    assert w[labels].mean() == pytest.approx(1.0)
    assert w[0] * 24 == pytest.approx(w[1] * 8) == pytest.approx(w[3] * 4)  # every class weighs the same
    assert w[2] == 1.0  # absent class


def test_balanced_batches_draw_classes_equally_and_split_ranks_evenly():
    from vitlora.recipe import balanced_batches

    labels = torch.tensor([0] * 90 + [1] * 10)
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([torch.cat(balanced_batches(labels, 16, gen)) for _ in range(20)])
    assert len(drawn) == 2000
    share = float((labels[drawn] == 1).float().mean())
    assert 0.45 < share < 0.55  # 10 % of the images, half of the draws
    ranks = [balanced_batches(labels[:-1], 8, torch.Generator().manual_seed(1), r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and sum(len(b) for b in ranks[0]) == 50


def test_class_weights_and_balanced_sampler_train_and_report_recall(tiny_model, imbalanced_folder, tmp_path,
                                                                    quiet_env):
    plain = train(tiny_model, imbalanced_folder, tmp_path / "plain")
    weighted = train(tiny_model, imbalanced_folder, tmp_path / "weighted", "--class-weights", "auto")
    sampled = train(tiny_model, imbalanced_folder, tmp_path / "sampled", "--balanced-sampler")
    for m in (plain, weighted, sampled):
        for e in m["epochs"]:
            assert set(e["val_recall_per_class"]) == {"red", "green", "blue"}
            assert all(0.0 <= r <= 1.0 for r in e["val_recall_per_class"].values())
    losses = [[e["train_loss"] for e in m["epochs"]] for m in (plain, weighted, sampled)]
    assert losses[0] != losses[1] and losses[0] != losses[2]
    config = json.loads((tmp_path / "weighted" / "vitlora.json").read_text())["config"]
    assert config["class_weights"] == "auto" and not config["balanced_sampler"]
    assert_plain_peft_and_merge_agree(tmp_path / "sampled", tiny_model, imbalanced_folder)


def test_class_weights_are_refused_in_extend_mode(tiny_model, red_folder, tmp_path, capsys, quiet_env):
    assert main(["train", str(red_folder), "--label", "red", "--model", str(tiny_model),
                 "--out", str(tmp_path / "x"), "--class-weights", "auto", *FAST]) == 2
    assert "--class-weights is for replace mode without --negatives" in capsys.readouterr().err


def test_extend_mode_takes_ema_patch_keep_sampler_and_dora_together(tiny_model, red_folder, colour_folder,
                                                                    tmp_path, quiet_env):
    out = tmp_path / "extend"
    assert main(["train", str(red_folder), "--label", "red", "--negatives", str(colour_folder / "green"),
                 "--model", str(tiny_model), "--out", str(out), *FAST, "--ema", "0.9", "--patch-keep", "0.5",
                 "--balanced-sampler", "--method", "dora", "--augment", "trivial", "--random-erasing", "0.3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(e["weights"] in ("ema", "raw") and "retention" in e for e in metrics["epochs"])
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    assert_plain_peft_and_merge_agree(out, tiny_model, red_folder)


# ---- stopping ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("losses, bad, auto, patience, stops", [
    ([0.50, 0.45, 0.44], 2, 2, None, False),  # fell 12 % over the 2 epochs without a better one: not yet
    ([0.50, 0.47, 0.46], 2, 2, None, True),   # fell 8 % over the 2 epochs: converged
    ([0.50, 0.40, 0.30], 2, 2, None, False),  # still falling fast: a later epoch may still win
    ([0.50, 0.49, 0.48], 1, 2, None, False),  # only 1 epoch without a better one
    ([0.50, 0.49, 0.48], 2, 0, None, False),  # --auto-stop 0
    ([0.50, 0.40, 0.30], 2, 0, 2, True),      # --early-stopping 2 ignores the loss
    ([0.50, 0.49], 2, 2, None, False),        # not enough history to judge the loss
])
def test_should_stop(losses, bad, auto, patience, stops):
    from vitlora.config import TrainConfig
    from vitlora.loop import should_stop
    from vitlora.persist import TrainState

    state = TrainState(epoch=len(losses), history=[{"epoch": i + 1, "train_loss": v} for i, v in enumerate(losses)],
                       bad_epochs=bad)
    config = TrainConfig(data="x", auto_stop=auto, early_stopping=patience)
    assert bool(should_stop(state, config)) is stops


def test_stopped_run_says_why_in_metrics(tiny_model, colour_folder, tmp_path, quiet_env, monkeypatch):
    monkeypatch.setenv("VITLORA_THREADS", "1")  # the same float sums every time
    metrics = train(tiny_model, colour_folder, tmp_path / "stop", "--epochs", "6", "--lr", "2",
                    "--early-stopping", "1")
    last = metrics["epochs"][-1]
    assert len(metrics["epochs"]) < 6 and last["stopped"].startswith("no better epoch for 1 epochs")
    assert all("stopped" not in e for e in metrics["epochs"][:-1])


def test_auto_stop_when_the_kept_epoch_cannot_change():
    """Extend / reject scores keep the earliest of equal epochs: at 1.0 nothing later can be kept, so stop
    (unless auto-stop is off, there is no later epoch, or the score has a tie-break, as replace mode's has)."""
    from vitlora.config import TrainConfig
    from vitlora.loop import should_stop
    from vitlora.persist import TrainState

    state = TrainState(epoch=1, history=[{"epoch": 1, "train_loss": 0.9}], best_epoch=1, best_score=1.0)
    cfg = TrainConfig(data="x", epochs=5)
    assert "the most there is" in should_stop(state, cfg, ties_keep_earliest=True)
    assert should_stop(state, cfg, ties_keep_earliest=False) is None
    assert should_stop(state, TrainConfig(data="x", epochs=5, auto_stop=0), ties_keep_earliest=True) is None
    assert should_stop(state, TrainConfig(data="x", epochs=1), ties_keep_earliest=True) is None
    state.best_score = 0.99
    assert should_stop(state, cfg, ties_keep_earliest=True) is None


def test_lr_schedule_waits_for_the_steps_a_grad_scaler_skips(tiny_model, colour_folder, tmp_path, monkeypatch,
                                                             quiet_env):
    # fp16 on a GPU: GradScaler skips steps whose gradients overflowed (always the first few); the schedule
    # must not run ahead of the optimizer (torch warned "lr_scheduler.step() before optimizer.step()").
    # Here a CPU scaler sees the first 3 steps' gradients overflow.
    import warnings

    import vitlora.loop as L

    loops, real_init, overflowed = [], L.Loop.__init__, []

    def overflow(grad: torch.Tensor) -> torch.Tensor:
        if len(overflowed) < 3:
            overflowed.append(1)
            return grad * float("inf")
        return grad

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        next(p for p in self.job.model.parameters() if p.requires_grad).register_hook(overflow)
        loops.append(self)

    monkeypatch.setattr(L.Loop, "__init__", init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train(tiny_model, colour_folder, tmp_path / "run")
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    loop = loops[0]
    assert loop.micro >= 8 and loop.scaler.get_scale() == 1024.0 / 2 ** 3  # one micro-batch a step, 3 skipped
    assert loop.sched.last_epoch == loop.steps_per_epoch * len(metrics["epochs"]) - 3
