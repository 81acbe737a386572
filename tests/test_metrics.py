"""Metric formulas checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from vitlora.metrics import classification_report, top_k_predictions


def test_report_matches_hand_computation():
    id2label = {0: "cat", 1: "dog", 2: "fox", 3: "owl"}
    # true:  cat cat cat dog dog fox ; pred: cat dog cat dog owl fox
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = [0, 1, 0, 1, 3, 2]
    logits = torch.full((6, 4), -2.0)
    for i, p in enumerate(preds):
        logits[i, p] = 3.0
    r = classification_report(logits, targets, id2label)
    assert r["n_images"] == 6
    assert r["accuracy"] == pytest.approx(4 / 6)
    # cat: tp 2, predicted 2, support 3 -> p 1, r 2/3; dog: tp 1, predicted 2, support 2 -> p .5, r .5
    # fox: tp 1, predicted 1, support 1 -> 1, 1.  owl has no support -> not in the macro means
    assert r["per_class"]["cat"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert r["per_class"]["dog"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert set(r["per_class"]) == {"cat", "dog", "fox"}
    assert r["macro_precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert r["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 1) / 3)
    p_true = math.exp(3) / (math.exp(3) + 3 * math.exp(-2))
    p_wrong = math.exp(-2) / (math.exp(3) + 3 * math.exp(-2))
    assert r["nll"] == pytest.approx(-(4 * math.log(p_true) + 2 * math.log(p_wrong)) / 6, rel=1e-5)
    assert r["confusion_matrix"]["labels"] == ["cat", "dog", "fox", "owl"]
    assert r["confusion_matrix"]["matrix"] == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert r["top5_accuracy"] == 1.0  # only 4 classes: top-4 always contains the truth


def test_top5_accuracy_counts_ranks():
    id2label = {i: str(i) for i in range(8)}
    logits = torch.arange(8.0).repeat(2, 1)  # ranking 7,6,5,4,3,2,1,0
    r = classification_report(logits, torch.tensor([3, 1]), id2label)
    assert r["top5_accuracy"] == 0.5  # class 3 is 5th, class 1 is 7th
    assert r["accuracy"] == 0.0


def test_top_k_predictions_sorted():
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    assert top_k_predictions(probs, {0: "a", 1: "b", 2: "c"}, 2) == [[("b", pytest.approx(0.6)),
                                                                       ("c", pytest.approx(0.3))]]


def test_ece_matches_hand_computation():
    from vitlora.metrics import expected_calibration_error, reliability_bins

    # bins of width 1/15: 0.05 -> bin 0, 0.5 -> bin 7 ((7/15, 8/15]), 0.9 and 0.93 -> bin 13 ((13/15, 14/15]),
    # 1.0 -> bin 14; exactly 2/15 belongs to bin 1 ((1/15, 2/15])
    scores = torch.tensor([0.05, 0.5, 0.5, 0.9, 0.93, 1.0, 2 / 15], dtype=torch.float64)
    correct = torch.tensor([False, True, False, True, False, True, True])
    bins = reliability_bins(scores, correct)
    assert [b["count"] for b in bins] == [1, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 2, 1]
    assert bins[13]["confidence"] == pytest.approx(0.915) and bins[13]["accuracy"] == 0.5
    # hand: (1*|0.05-0| + 1*|2/15-1| + 2*|0.5-0.5| + 2*|0.915-0.5| + 1*|1-1|) / 7
    expected = (0.05 + (1 - 2 / 15) + 0 + 2 * 0.415 + 0) / 7
    assert expected_calibration_error(scores, correct) == pytest.approx(expected)
    # a perfectly calibrated set scores 0, an always-wrong confident one scores its confidence
    assert expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([True, True])) == 0.0
    assert expected_calibration_error(torch.tensor([0.8, 0.8]), torch.tensor([False, False])) == pytest.approx(0.8)


def test_report_has_ece_of_top1_softmax():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    targets = torch.tensor([0, 0, 0])
    r = classification_report(logits, targets, {0: "a", 1: "b"})
    p = torch.softmax(logits, -1).max(-1).values
    # each score in its own bin: |p0 - 1| + |p1 - 0| + |p2 - 1|, over 3
    assert r["ece"] == pytest.approx(float((1 - p[0]) + p[1] + (1 - p[2])) / 3, rel=1e-5)


def test_auroc_and_fpr_at_tpr_by_hand():
    from vitlora.metrics import auroc, fpr_at_tpr

    pos = torch.tensor([0.9, 0.8, 0.4, 0.7])
    neg = torch.tensor([0.1, 0.4, 0.85])
    # pairs (p > n): 0.9: 3; 0.8: 2; 0.4: 1 + tie 0.5; 0.7: 2 -> 8.5 of 12
    assert auroc(pos, neg) == pytest.approx(8.5 / 12)
    # keeping >= 95 % of 4 positives needs all 4: threshold 0.4 -> negatives >= 0.4: 0.4 and 0.85
    assert fpr_at_tpr(pos, neg, 0.95) == pytest.approx(2 / 3)
    # 75 %: threshold 0.7 -> only 0.85
    assert fpr_at_tpr(pos, neg, 0.75) == pytest.approx(1 / 3)


def test_ece_if_calibrated_is_the_small_sample_floor():
    """A perfectly calibrated model still shows ECE > 0 on few images; the floor shrinks with more of them
    and is ~0 when every score is 1 (a right answer each time)."""
    from vitlora.metrics import ece_if_calibrated, expected_calibration_error

    g = torch.Generator().manual_seed(1)
    few, many = 0.3 + 0.7 * torch.rand(200, generator=g), 0.3 + 0.7 * torch.rand(5000, generator=g)
    floor_few, floor_many = ece_if_calibrated(few), ece_if_calibrated(many)
    assert 0.05 < floor_few < 0.11 and floor_many < 0.03 and floor_many < floor_few / 2
    assert ece_if_calibrated(torch.ones(50)) == 0.0
    assert ece_if_calibrated(few) == floor_few  # seeded
    # a model that says 0.95 but is right half the time is far above its floor
    sure = torch.full((200,), 0.95)
    wrong = torch.arange(200) % 2 == 0
    assert expected_calibration_error(sure, wrong) > 5 * ece_if_calibrated(sure)
