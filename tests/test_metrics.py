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
