"""Extend-mode machinery (vitlora.extend, extend_math, heads, vitlora.negatives) on a tiny random ViT (fast)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BASE_LABELS, make_colour_images

from vitlora.cli import main
from vitlora.extend_math import (
    calibrate_thresholds,
    distill_kl,
    extend_loss,
    imprint_rows,
    linear_probe,
    new_class_margins,
    positive_threshold,
    reject_new,
)

FAST = ["--epochs", "2", "--batch-size", "8", "--lr", "5e-3", "--quiet", "--rank", "4", "--alpha", "8"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def neg_folder(tmp_path_factory) -> Path:
    """Unlabelled 'other' photos in a nested tree (negatives are found recursively)."""
    root = tmp_path_factory.mktemp("negs")
    make_colour_images(root / "a" / "deep", "green", 10, seed=11)
    make_colour_images(root / "b", "blue", 10, seed=12)
    return root


@pytest.fixture(scope="module")
def ext_run(tiny_model, red_folder, neg_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ext") / "red"
    assert run_cli("train", red_folder, "--label", "raccoon", "--model", tiny_model, "--out", out,
                   "--negatives", neg_folder, "--val-split", "0.25", *FAST) == 0
    return out


# ---- pure functions ---------------------------------------------------------------------


def test_imprint_rows_math():
    feats = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    labels = torch.tensor([7, 7, 9, 9])
    rows = imprint_rows(feats, labels, [9, 7], norm=2.0)
    # class 9: normalised features (1,0,0) and (0,1,0); mean (.5,.5,0); normalised * 2
    assert torch.allclose(rows[0], torch.tensor([math.sqrt(2), math.sqrt(2), 0.0]), atol=1e-6)
    # class 7: (.6,.8,0) and (0,0,1) -> mean (.3,.4,.5) -> norm 2
    expect = torch.tensor([0.3, 0.4, 0.5]) / torch.tensor([0.3, 0.4, 0.5]).norm() * 2
    assert torch.allclose(rows[1], expect, atol=1e-6)
    assert torch.allclose(rows.norm(dim=1), torch.tensor([2.0, 2.0]))


def test_distillation_is_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    z = torch.randn(5, 10)
    assert torch.allclose(distill_kl(z, z), torch.zeros(5), atol=1e-6)
    assert torch.allclose(distill_kl(z + 3.0, z), torch.zeros(5), atol=1e-6)  # softmax is shift-invariant
    assert (distill_kl(torch.randn(5, 10), z) > 0).all()
    # extend_loss on negatives whose student matches the teacher and gives the new class no mass
    student = torch.cat([z, torch.full((5, 1), -1e4)], dim=1)
    loss = extend_loss(student, torch.full((5,), -1), z, n_old=10, distill=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_negative_loss_is_soft_cross_entropy_against_base_with_zero_new_mass():
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 12), torch.randn(4, 10)
    p_t = torch.softmax(teacher, -1)
    soft_ce = -(p_t * torch.log_softmax(student, -1)[:, :10]).sum(-1)
    entropy = -(p_t * torch.log_softmax(teacher, -1)).sum(-1)
    assert torch.allclose(distill_kl(student[:, :10], teacher) + reject_new(student, 10), soft_ce - entropy,
                          atol=1e-5)
    p_new = torch.softmax(student, -1)[:, 10:].sum(-1)
    assert torch.allclose(reject_new(student, 10), -torch.log1p(-p_new), atol=1e-5)


def test_extend_loss_positive_part_is_cross_entropy_plus_weighted_kl():
    torch.manual_seed(2)
    logits, teacher = torch.randn(3, 11), torch.randn(3, 10)
    labels = torch.tensor([10, 10, 10])
    expect = F.cross_entropy(logits, labels) + 0.5 * distill_kl(logits[:, :10], teacher).mean()
    assert extend_loss(logits, labels, teacher, 10, distill=0.5).item() == pytest.approx(expect.item(), rel=1e-5)
    assert extend_loss(logits, labels, None, 10, distill=0.5).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_margins():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0], [0.0, 4.0, 1.0, -1.0]])
    assert torch.equal(new_class_margins(logits, 2), torch.tensor([[-1.0, 2.0], [-3.0, -5.0]]))


def test_calibration_hits_target_recall():
    g = torch.Generator().manual_seed(0)
    pos = 2.0 + torch.randn(400, generator=g)
    for target in (0.8, 0.9, 0.95):
        t = positive_threshold(pos, target)
        recall = int((pos > t).sum()) / len(pos)
        assert target <= recall <= target + 0.03, (target, recall)
    # on ten photos the threshold is at most the weakest one's margin (every one of them passes)
    few = pos[:10]
    assert (few > positive_threshold(few, 0.95)).all()
    # a constructed model: shifting the new class's bias by -t gives the target recall
    logits = torch.zeros(400, 4)
    logits[:, :3] = torch.randn(400, 3, generator=g)
    logits[:, 3] = logits[:, :3].max(-1).values + pos  # the new class's margins are `pos`
    t = calibrate_thresholds([new_class_margins(logits, 3)[:, 0]], None, 0.9)[0]["threshold"]
    logits[:, 3] -= t
    assert int((logits.argmax(-1) == 3).sum()) / 400 == pytest.approx(0.9, abs=0.0125)


def test_calibration_with_negatives_reports_conflict():
    pos = torch.tensor([4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    t = positive_threshold(pos, 0.9)
    low = calibrate_thresholds([pos], torch.tensor([[-6.0], [-2.0]]), 0.9)[0]
    assert low["threshold"] == pytest.approx(t) and not low["conflict"] and low["held_out_fp"] == 0
    high = calibrate_thresholds([pos], torch.tensor([[8.5], [0.0]]), 0.9)[0]
    assert high["threshold"] == pytest.approx(t) and high["conflict"] and high["held_out_fp"] == 0.5
    alone = calibrate_thresholds([pos], None, 0.9)[0]
    assert alone["threshold"] == pytest.approx(t) and "neg_max" not in alone
    assert calibrate_thresholds([torch.empty(0)], None, 0.9)[0]["calibrated"] is False


# ---- negatives generator ----------------------------------------------------------------


def test_fold_ids_balanced_and_seeded():
    from vitlora.extend_math import fold_ids

    f = fold_ids(23, 5, seed=3)
    assert sorted(torch.bincount(f).tolist()) == [4, 4, 5, 5, 5]
    assert torch.equal(f, fold_ids(23, 5, seed=3)) and not torch.equal(f, fold_ids(23, 5, seed=4))


def test_conformal_threshold_uses_the_n_plus_1_rank():
    m = torch.arange(1.0, 11.0)  # 10 margins 1..10
    # plain: ceil(0.8 * 10) = 8th highest = 3; conformal: ceil(0.8 * 11) = 9th highest = 2
    assert positive_threshold(m, 0.8) <= 3.0 - 1e-5 and positive_threshold(m, 0.8) > 2.0
    t = positive_threshold(m, 0.8, conformal=True)
    assert t <= 2.0 - 1e-5 and (m > t).sum() == 9


def test_out_of_fold_logits_never_see_their_own_fold():
    from vitlora.extend_math import fold_ids, out_of_fold_new_logits

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 6, generator=g)
    labels = torch.tensor([3] * 12 + [-1] * 18)
    old = torch.randn(30, 3, generator=g)
    folds = fold_ids(30, 3, seed=0)
    w, b = torch.zeros(1, 6), torch.zeros(1)
    a = out_of_fold_new_logits(feats, labels, old, folds, w, b, 1.0, 30, 0.05)
    flipped = labels.clone()
    flipped[folds == 0] = -1  # fold 0's own labels change: its logits must not
    c = out_of_fold_new_logits(feats, flipped, old, folds, w, b, 1.0, 30, 0.05)
    assert torch.equal(a[folds == 0], c[folds == 0])
    assert not torch.equal(a[folds == 1], c[folds == 1])


def test_cross_fitted_metrics_threshold_from_other_folds():
    from vitlora.extend_math import cross_fitted_metrics

    # 1 old class (logit 0) + 1 new class; margins are the new logits. Two folds.
    new = torch.tensor([[5.0], [1.0], [4.0], [3.0], [-1.0], [0.5], [2.0], [-2.0]])
    labels = torch.tensor([1, 1, 1, 1, -1, -1, -1, -1])
    folds = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    old = torch.zeros(8, 1)
    base_top1 = torch.zeros(4, dtype=torch.long)
    m = cross_fitted_metrics(old, new, labels, folds, [1], 0.5, base_top1)
    # fold 0 scored with fold 1's positives {4, 3}: conformal rank ceil(0.5 * 3) = 2nd highest = 3 (minus 1e-4,
    # or lower by the normal fit 3.5 - 0*0.707 = 3.5 -> 3 - 1e-4): 5 passes, 1 not; negatives -1, 0.5 not
    # fold 1 scored with fold 0's positives {5, 1}: 2nd highest = 1, normal fit 3 - 0 = 3 -> 1 - 1e-4:
    # 4 and 3 pass; negatives 2 passes, -2 not
    assert m["new_class_recall"] == {1: pytest.approx(3 / 4)}
    assert m["false_positive_rate"] == pytest.approx(1 / 4)
    assert m["retention"] == pytest.approx(3 / 4)
    # + two stored exemplars of an earlier class (label -2, answer to keep: class 0), in fold 0 (threshold 3):
    # new logit 10 is taken by the new class, -5 is kept; negatives' numbers do not change
    m2 = cross_fitted_metrics(torch.zeros(10, 1), torch.cat([new, torch.tensor([[10.0], [-5.0]])]),
                              torch.cat([labels, torch.tensor([-2, -2])]), torch.cat([folds, torch.tensor([0, 0])]),
                              [1], 0.5, torch.zeros(6, dtype=torch.long))
    assert m2["earlier_classes_kept"] == pytest.approx(1 / 2)
    assert (m2["false_positive_rate"], m2["retention"]) == (m["false_positive_rate"], m["retention"])


def test_make_negatives_splits_by_source_and_is_deterministic(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from PIL import Image

    from vitlora.negatives import main as neg_main
    from vitlora.negatives import make_negatives, source_names

    train = make_negatives(tmp_path / "train", "train", per_image=2, seed=0)
    test = make_negatives(tmp_path / "test", "test", per_image=2, seed=0)
    assert len(train) == 2 * len(source_names("train")) and len(test) == 2 * len(source_names("test"))
    assert not {p.parent.name for p in train} & {p.parent.name for p in test}
    assert set(source_names("all")) == set(source_names("train")) | set(source_names("test"))
    modes = {Image.open(p).mode for p in train + test}
    assert modes == {"RGB", "L"}  # colour and greyscale
    assert all(min(Image.open(p).size) == 256 for p in train)
    again = make_negatives(tmp_path / "again", "train", per_image=2, seed=0)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in train]
    other = make_negatives(tmp_path / "other", "train", per_image=2, seed=1)
    assert other[0].read_bytes() == train[0].read_bytes()  # the whole image first, whatever the seed
    assert other[1].read_bytes() != train[1].read_bytes()  # crops follow the seed
    assert neg_main([str(tmp_path / "cli"), "--per-image", "1", "--split", "test"]) == 0
    assert len(list((tmp_path / "cli").rglob("*.jpg"))) == len(source_names("test"))


# ---- training in extend mode ------------------------------------------------------------


def test_extend_run_records_metrics_and_calibration(ext_run: Path):
    metrics = json.loads((ext_run / "metrics.json").read_text())
    for e in metrics["epochs"]:
        assert 0 <= e["new_class_recall"] <= 1 and 0 <= e["false_positive_rate"] <= 1 and 0 <= e["retention"] <= 1
    ext = metrics["extend"]
    cal = ext["calibration"]["raccoon"]
    # out of fold over ALL photos: 16 positives (train + held out), 20 negatives, 5 folds
    assert cal["calibrated"] and cal["n_pos"] == 16 and "out-of-fold" in cal["method"]
    oof = ext["out_of_fold"]
    assert oof["folds"] == 5 and oof["n_positives"] == 16 and oof["n_negatives"] == 20
    for key in ("false_positive_rate", "retention"):
        assert 0 <= oof[key] <= 1
    assert 0 <= oof["new_class_recall"]["raccoon"] <= 1
    meta = json.loads((ext_run / "vitlora.json").read_text())
    assert meta["extend"]["calibration"]["raccoon"]["bias_shift"] == pytest.approx(-cal["threshold"])


def test_extend_stops_once_the_kept_epoch_cannot_change(tiny_model: Path, red_folder: Path, tmp_path: Path):
    """Positives only, the score is the held-out recall; the first epoch already has all of them (1.0).
    Extend mode keeps the earliest of equal epochs, so auto-stop ends the run there and metrics.json
    says why; with --auto-stop 0 all epochs run, epoch 1 is still the one kept, and the run is the same."""
    args = ["train", red_folder, "--label", "raccoon", "--model", tiny_model, "--val-split", "0.25", *FAST[2:],
            "--epochs", "4"]
    assert run_cli(*args, "--out", tmp_path / "auto") == 0
    assert run_cli(*args, "--out", tmp_path / "all", "--auto-stop", "0") == 0
    auto = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    full = json.loads((tmp_path / "all" / "metrics.json").read_text())
    first = auto["epochs"][0]
    assert first["new_class_recall"] == 1.0
    assert len(auto["epochs"]) == 1 and "the most there is" in first["stopped"]
    assert len(full["epochs"]) == 4 and full["best_epoch"] == auto["best_epoch"] == 1
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "auto" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "all" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # the same run


def test_extend_held_out_calibration_when_cv_folds_0(tiny_model: Path, red_folder: Path, neg_folder: Path,
                                                     tmp_path: Path, capsys):
    out = tmp_path / "held"
    assert run_cli("train", red_folder, "--label", "raccoon", "--model", tiny_model, "--out", out, "--negatives",
                   neg_folder, "--val-split", "0.25", "--cv-folds", "0", *FAST) == 0
    ext = json.loads((out / "metrics.json").read_text())["extend"]
    cal = ext["calibration"]["raccoon"]
    assert cal["calibrated"] and cal["n_pos"] == 4 and cal["n_neg"] == 5
    assert ext["held_out"]["new_class_recall"]["raccoon"] >= 0.95  # the target, on the photos that set it
    assert "these photos also set the threshold" in capsys.readouterr().err


def test_summary_says_out_of_fold_with_sample_size(tiny_model: Path, red_folder: Path, neg_folder: Path,
                                                   tmp_path: Path, capsys):
    out = tmp_path / "oof"
    assert run_cli("train", red_folder, "--label", "raccoon", "--model", tiny_model, "--out", out, "--negatives",
                   neg_folder, "--val-split", "0.25", "--cv-folds", "4", *FAST) == 0
    err = capsys.readouterr().err
    assert "out of fold (4 folds over all 16 photos" in err and "on 16 photos" in err and "on 20 negatives" in err


def test_linear_probe_keeps_rows_within_max_norm_and_bias_free():
    """Separable positives vs negatives: unbounded, the logistic loss keeps lengthening the row; with
    `max_norm` every row ends at most that long and the bias still moves."""
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(20, 6, generator=g) + 3, torch.randn(20, 6, generator=g) - 3])
    labels = torch.cat([torch.full((20,), 4), torch.full((20,), -1)])
    teacher = torch.randn(40, 4, generator=g)
    w0, b0 = torch.full((1, 6), 0.1), torch.zeros(1)
    w_free, _ = linear_probe(feats, labels, teacher, w0, b0, distill=1.0, steps=200, lr=0.05)
    w_cap, b_cap = linear_probe(feats, labels, teacher, w0, b0, distill=1.0, steps=200, lr=0.05, max_norm=0.5)
    assert w_free.norm() > 1.0  # grows past the cap below when free
    assert w_cap.norm() <= 0.5 + 1e-5 and b_cap.abs().item() > 1e-3
    # the capped row still separates the two groups
    new = feats @ w_cap.T + b_cap
    assert new[:20].min() > new[20:].max()


def test_row_norm_cap_default_with_negatives_or_several_new_classes():
    from types import SimpleNamespace

    from vitlora.crossfit import ROW_NORM_CAP, row_norm_limit

    change = SimpleNamespace(row_norm=2.0)
    auto, off, set_ = (SimpleNamespace(row_norm_cap=v) for v in (None, 0.0, 3.0))
    assert row_norm_limit(change, auto, negatives=True) == pytest.approx(ROW_NORM_CAP * 2.0)
    assert row_norm_limit(change, auto, negatives=False) is None
    assert row_norm_limit(change, auto, negatives=False, several_new=True) == pytest.approx(ROW_NORM_CAP * 2.0)
    assert row_norm_limit(change, off, negatives=True) is None
    assert row_norm_limit(change, off, negatives=False, several_new=True) is None
    assert row_norm_limit(change, set_, negatives=False) == pytest.approx(6.0)


def _new_row_norms(run: Path, n_old: int) -> torch.Tensor:
    """The saved new head rows' norms as trained (the folded temperature, if any, undone)."""
    from safetensors.torch import load_file

    saved = load_file(str(run / "adapter_model.safetensors"))
    w = next(v for k, v in saved.items() if k.endswith("classifier.weight"))
    temperature = json.loads((run / "vitlora.json").read_text())["extend"].get("temperature") or {}
    return w[n_old:].norm(dim=1) * temperature.get("value", 1.0)


def test_several_classes_added_at_once_have_capped_rows(tiny_model: Path, colour_folder: Path,
                                                    tmp_path: Path):
    # four cat breeds added at once with positives only took 13 % of ImageNet photos uncapped, 2.5 % capped
    from transformers import AutoModelForImageClassification

    from vitlora.crossfit import ROW_NORM_CAP

    base = AutoModelForImageClassification.from_pretrained(tiny_model)
    n_old = base.config.num_labels
    limit = ROW_NORM_CAP * base.classifier.weight.detach().norm(dim=1).median()
    assert main(["train", str(colour_folder), "--mode", "extend", "--model", str(tiny_model), "--out",
                 str(tmp_path / "three"), "--epochs", "1", "--quiet"]) == 0
    norms = _new_row_norms(tmp_path / "three", n_old)
    assert len(norms) == 2 and (norms <= limit + 1e-4).all(), (norms, limit)  # "blue" is a base label
    assert main(["train", str(colour_folder), "--mode", "extend", "--model", str(tiny_model), "--out",
                 str(tmp_path / "three-uncapped"), "--epochs", "1", "--quiet", "--row-norm-cap", "0"]) == 0
    assert (_new_row_norms(tmp_path / "three-uncapped", n_old) > limit).any()  # the cap did bind above


def test_extend_run_with_negatives_has_capped_rows(ext_run: Path, tiny_model: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    from vitlora.crossfit import ROW_NORM_CAP

    base = AutoModelForImageClassification.from_pretrained(tiny_model)
    saved = load_file(str(ext_run / "adapter_model.safetensors"))
    w = next(v for k, v in saved.items() if k.endswith("classifier.weight"))
    median = base.classifier.weight.detach().norm(dim=1).median()
    t = json.loads((ext_run / "vitlora.json").read_text())["extend"]["temperature"]["value"]
    assert w[8].norm() * t <= ROW_NORM_CAP * median + 1e-4  # capped, then the whole head divided by T


def test_extend_keeps_old_head_rows_exactly(ext_run: Path, tiny_model: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    base = AutoModelForImageClassification.from_pretrained(tiny_model)
    saved = load_file(str(ext_run / "adapter_model.safetensors"))
    w = next(v for k, v in saved.items() if k.endswith("classifier.weight"))
    b = next(v for k, v in saved.items() if k.endswith("classifier.bias"))
    assert w.shape[0] == 9
    # trained with negatives: the out-of-fold temperature T divides the whole head (every answer unchanged),
    # so the old rows are the base's over T, exactly that
    meta = json.loads((ext_run / "vitlora.json").read_text())
    t = meta["extend"]["temperature"]["value"]
    assert 0.05 <= t <= 20 and meta["extend"]["temperature"]["n_images"] == 36
    assert torch.allclose(w[:8] * t, base.classifier.weight.detach(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(b[:8] * t, base.classifier.bias.detach(), atol=1e-5, rtol=1e-5)
    assert b[8].item() * t == pytest.approx(meta["extend"]["calibration"]["raccoon"]["bias"], abs=1e-4)


def test_extend_without_calibration_keeps_old_rows_exactly(tiny_model: Path, red_folder: Path, neg_folder: Path,
                                                           tmp_path: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    out = tmp_path / "raw"
    assert run_cli("train", red_folder, "--label", "raccoon", "--model", tiny_model, "--out", out,
                   "--negatives", neg_folder, "--val-split", "0.25", "--no-calibrate", *FAST) == 0
    base = AutoModelForImageClassification.from_pretrained(tiny_model)
    saved = load_file(str(out / "adapter_model.safetensors"))
    w = next(v for k, v in saved.items() if k.endswith("classifier.weight"))
    b = next(v for k, v in saved.items() if k.endswith("classifier.bias"))
    assert torch.equal(w[:8], base.classifier.weight.detach()) and torch.equal(b[:8], base.classifier.bias.detach())
    assert "temperature" not in json.loads((out / "vitlora.json").read_text())["extend"]


def test_imprinting_initialises_new_rows_from_class_means(tiny_model: Path, colour_folder: Path):
    from vitlora.data import build_cache, discover
    from vitlora.data.transforms import Preprocess
    from vitlora.heads import base_outputs, imprint_new_rows, trainable_head
    from vitlora.lora import wrap_lora
    from vitlora.modeling import load_base, load_processor_config
    from vitlora.surgery import replace_head

    model, _ = load_base(str(tiny_model))
    base_head = model.classifier.weight.detach().clone()
    pp = Preprocess.from_dict(load_processor_config(str(tiny_model)))
    source = discover(str(colour_folder))
    change = replace_head(model, source.labels)  # blue matches the base, green and red are new
    assert change.new_labels == ["green", "red"]
    peft_model = wrap_lora(model, ["q_proj", "v_proj"], "classifier", 4, 8, 0.0)
    cache, _ = build_cache(source.samples, change.data_label2id(), pp, train=True)
    outs = imprint_new_rows(peft_model, change, cache, pp, torch.device("cpu"))
    head = trainable_head(peft_model, "classifier")
    expect = imprint_rows(outs.features, cache.labels, [1, 2], change.row_norm)
    assert torch.allclose(head.weight[1:].detach(), expect, atol=1e-6)
    assert torch.allclose(head.weight[0].detach(), base_head[3])  # "blue" copied from the base
    assert change.row_norm == pytest.approx(float(base_head.norm(dim=1).median()))
    # features are the base's head inputs: recomputing them independently agrees
    again = base_outputs(peft_model, "classifier", cache, pp, torch.device("cpu"), work_size=True)
    assert torch.allclose(again.features, outs.features)


def test_multi_class_extend_imagefolder(tiny_model: Path, colour_folder: Path, neg_folder: Path, tmp_path: Path):
    out = tmp_path / "multi"
    assert run_cli("train", colour_folder, "--mode", "extend", "--model", tiny_model, "--out", out,
                   "--val-split", "0.25", *FAST) == 0
    labels = json.loads((out / "labels.json").read_text())
    assert labels["new_labels"] == ["green", "red"] and labels["data_label2id"]["blue"] == 3
    assert [labels["id2label"][str(i)] for i in range(10)] == TINY_BASE_LABELS + ["green", "red"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["epochs"][-1]["new_class_recall_per_class"]) == {"green", "red"}
    assert "false_positive_rate" not in metrics["epochs"][-1]  # no negatives: not measured
    cal = metrics["extend"]["calibration"]
    assert set(cal) == {"green", "red"} and all(c["calibrated"] for c in cal.values())
    evaluated = tmp_path / "eval.json"
    assert run_cli("eval", out, colour_folder, "--negatives", neg_folder / "b", "--json", evaluated) == 0
    r = json.loads(evaluated.read_text())
    assert set(r["new_class_recall"]) == {"green", "red", "mean"}


def test_stacking_two_extend_runs_keeps_old_and_first_classes(ext_run: Path, tiny_model: Path, tmp_path: Path,
                                                             neg_folder: Path):
    import vitlora
    from vitlora.evaluation import negative_metrics

    greens = tmp_path / "greens"
    make_colour_images(greens, "green", 12, seed=21)
    out = tmp_path / "stacked"
    assert run_cli("train", greens, "--label", "lime", "--model", ext_run, "--out", out, "--val-split", "0.25",
                   "--negatives", neg_folder / "b", *FAST) == 0
    run = vitlora.load(out)
    assert run.labels == TINY_BASE_LABELS + ["raccoon", "lime"]
    assert run.new_labels == ["lime"]
    meta = json.loads((out / "vitlora.json").read_text())
    assert meta["stacked_on"] and Path(meta["base_model"]) == ext_run.resolve()
    # the first run's head rows (base + raccoon) are carried over exactly, up to this run's own temperature
    first = vitlora.load(ext_run)
    stacked = vitlora.load(out)
    t = meta["extend"]["temperature"]["value"]
    assert torch.allclose(stacked.model.classifier.weight[:9] * t, first.model.classifier.weight, atol=1e-5,
                          rtol=1e-5)
    # retention is measured against the first run (merged), the stacked run's base
    m = negative_metrics(stacked, str(greens), str(neg_folder / "b"), label="lime")
    assert set(m) >= {"new_class_recall", "false_positive_rate", "retention"}
    assert m["new_class_recall"]["mean"] >= 0.9
    # the first run's stored exemplars of "raccoon" (all 16 photos) protect it in the stacked run, and the
    # features of its 20 negatives (class id -1) travel too, so a later step with positives only still has
    # photos of other things (here: its own 10 blue negatives + the 20 carried)
    from safetensors.torch import load_file

    first_ex = load_file(str(ext_run / "exemplars.safetensors"))
    assert first_ex["labels"].tolist() == [8] * 16 + [-1] * 20 and first_ex["features"].shape == (36, 32)
    oof = meta["extend"]["out_of_fold"]
    assert oof["n_exemplars"] == 16 and 0 <= oof["earlier_classes_kept"] <= 1
    assert (oof["n_negatives"], oof["n_carried_negatives"]) == (30, 20) and 0 <= oof["false_positive_rate"] <= 1
    stacked_ex = load_file(str(out / "exemplars.safetensors"))  # inherited 36 + its own 12 + its 10 negatives
    assert sorted(stacked_ex["labels"].tolist()) == [-1] * 30 + [8] * 16 + [9] * 12
    assert torch.equal(stacked_ex["features"][:36], first_ex["features"])


def test_negative_metrics_match_hand_computation(ext_run: Path, red_folder: Path, neg_folder: Path, tiny_model):
    import vitlora
    from vitlora.data import expand_image_paths
    from vitlora.evaluation import negative_metrics
    from vitlora.modeling import load_base

    run = vitlora.load(ext_run)
    m = negative_metrics(run, str(red_folder), str(neg_folder), label="raccoon")
    negs = expand_image_paths([str(neg_folder)])
    assert m["n_negatives"] == len(negs) == 20
    top_run = {p.path: p.top_k[0][0] for p in run.predict(negs, top_k=1)}
    base, _ = load_base(str(tiny_model))
    from vitlora.data import load_rgb, normalize, resize_for_eval

    x = normalize(torch.stack([resize_for_eval(load_rgb(p), run.preprocess) for p in negs]), run.preprocess)
    with torch.no_grad():
        base_top = [TINY_BASE_LABELS[i] for i in base(pixel_values=x).logits.argmax(-1).tolist()]
    fp = sum(top_run[p] == "raccoon" for p in negs) / len(negs)
    kept = sum(top_run[p] == b for p, b in zip(negs, base_top)) / len(negs)
    assert m["false_positive_rate"] == pytest.approx(fp)
    assert m["retention"] == pytest.approx(kept)
    assert m["false_positives_by_class"] == {"raccoon": round(fp * len(negs))}
    reds = expand_image_paths([str(red_folder)])
    recall = sum(p.top_k[0][0] == "raccoon" for p in run.predict(reds, top_k=1)) / len(reds)
    assert m["new_class_recall"] == {"raccoon": pytest.approx(recall), "mean": pytest.approx(recall)}


def test_eval_cli_with_negatives(ext_run: Path, red_folder: Path, neg_folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "e.json"
    assert run_cli("eval", ext_run, red_folder, "--label", "raccoon", "--negatives", neg_folder, "--json", out) == 0
    printed = capsys.readouterr().out
    for key in ("new_class_recall", "false_positive_rate", "retention"):
        assert key in printed
    r = json.loads(out.read_text())
    assert r["accuracy"] == pytest.approx(r["new_class_recall"]["mean"])  # DATA holds only new-class photos


def test_without_negatives_warns_and_says_fp_not_measured(tiny_model: Path, red_folder: Path, tmp_path: Path,
                                                          capsys):
    out = tmp_path / "pos-only"
    assert run_cli("train", red_folder, "--label", "raccoon", "--model", tiny_model, "--out", out,
                   "--val-split", "0.25", *FAST) == 0
    err = capsys.readouterr().err
    assert "warning: trained without --negatives" in err and "could not be measured" in err
    assert "new-class recall:" in err


def test_threshold_floor_keeps_earlier_classes_exemplars():
    """Positives alone would put the threshold at -1.5 (their 95 % point); 20 exemplars of an earlier class
    score 0..1.9, so the floor lets the new class take at most 1 of them (floor((1 - 0.95) * 20))."""
    from vitlora.extend_math import new_class_shift

    pos = torch.linspace(-1.0, 5.0, 40)
    ex = torch.arange(20, dtype=torch.float32) / 10  # 0.0 .. 1.9
    margins = torch.cat([pos, ex])[:, None]
    labels = torch.cat([torch.full((40,), 7), torch.full((20,), -2)])
    alone = new_class_shift(pos[:, None], labels[:40], [7], 0.95)
    t = new_class_shift(margins, labels, [7], 0.95)
    assert alone.item() < 0 and t.item() == pytest.approx(1.8)
    assert int((ex > t).sum()) == 1  # one exemplar taken, 19 kept
    negatives_only = torch.cat([torch.full((40,), 7), torch.full((20,), -1)])  # photos of other things: no floor
    assert new_class_shift(margins, negatives_only, [7], 0.95).item() == pytest.approx(alone.item())


def test_stacked_positives_only_uses_carried_negatives(ext_run: Path, tiny_model: Path, tmp_path: Path, capsys):
    """ext_run was trained with 20 negatives; a run stacked on it with positives only gets their features as
    negatives (no 'could not be measured' warning; the summary's FP rate is on those 20) and capped rows."""
    from safetensors.torch import load_file

    from vitlora.crossfit import ROW_NORM_CAP

    greens = tmp_path / "greens"
    make_colour_images(greens, "green", 12, seed=31)
    out = tmp_path / "stacked-pos"
    assert run_cli("train", greens, "--label", "lime", "--model", ext_run, "--out", out, "--val-split", "0.25",
                   *FAST) == 0
    err = capsys.readouterr().err
    assert "the 20 negatives carried from" in err and "could not be measured" not in err
    oof = json.loads((out / "vitlora.json").read_text())["extend"]["out_of_fold"]
    assert (oof["n_negatives"], oof["n_carried_negatives"]) == (20, 20) and "false_positive_rate" in oof
    w = next(v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if k.endswith("classifier.weight"))
    median = w[:9].norm(dim=1).median()  # the rows of the run it stacks on (8 base rows + raccoon)
    assert w[9].norm() <= ROW_NORM_CAP * median + 1e-4


def test_extend_temperature_sharpens_an_underconfident_head_and_softens_an_overconfident_one():
    from vitlora.calibration import fit_extend_temperature

    def head(margin: float, wrong: int) -> tuple[torch.Tensor, torch.Tensor]:
        """4 old classes + 1 new; 20 positives, 20 negatives; `wrong` of each on the wrong side by `margin`."""
        rows, labels = [], []
        for i in range(20):
            sign = -1.0 if i < wrong else 1.0
            rows.append([0.0, 0.0, 0.0, 0.0, sign * margin])  # positive: the new class wins unless wrong
            labels.append(4)
            rows.append([margin, 0.0, 0.0, 0.0, -sign * margin])  # negative: old class 0 wins unless wrong
            labels.append(-1)
        return torch.tensor(rows), torch.tensor(labels)

    under, y = head(margin=1.0, wrong=1)  # right 95 % of the time, but softmax says ~40 %
    over, y2 = head(margin=12.0, wrong=6)  # says ~100 %, right 70 % of the time
    t_under, t_over = fit_extend_temperature(under, y, 4), fit_extend_temperature(over, y2, 4)
    assert t_under < 1.0 < t_over
    assert torch.equal((under / t_under).argmax(-1), under.argmax(-1))  # dividing by T keeps every answer
