"""Every metric against numbers worked out by hand on small fixed outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clipbatch.commands.metrics import (calibration_bins, classification_report, confusion_matrix,
                                        expected_calibration_error, fit_temperature, mean_per_class_recall,
                                        negative_log_likelihood, per_class, top_k_accuracy)
from clipbatch.model.scoring import probabilities

CLASSES = ["a", "b", "c"]
TRUTH = np.array([0, 0, 1, 1, 2])
PREDICTED = np.array([0, 1, 1, 1, 0])


def test_confusion_per_class_and_mean_recall():
    m = confusion_matrix(TRUTH, PREDICTED, 3)
    assert m.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    pc = per_class(m, CLASSES)
    # a: 1 of 2 right, predicted twice; b: 2 of 2, predicted 3 times; c: never predicted
    assert pc["a"] == {"n": 2, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert pc["b"]["precision"] == pytest.approx(2 / 3) and pc["b"]["recall"] == 1.0
    assert pc["b"]["f1"] == pytest.approx(0.8) and pc["b"]["n"] == 2
    assert pc["c"] == {"n": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert mean_per_class_recall(m) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # a class without examples does not count in the mean
    assert mean_per_class_recall(confusion_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), 4)) == 0.75


def test_top_k():
    scores = np.array([[0.50, 0.10, 0.05, 0.05, 0.05, 0.25],    # truth 5: 2nd
                       [0.05, 0.10, 0.15, 0.20, 0.20, 0.30],    # truth 0: 6th
                       [0.10, 0.60, 0.05, 0.05, 0.10, 0.10]])   # truth 1: 1st
    truth = np.array([5, 0, 1])
    assert top_k_accuracy(scores, truth, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, truth, 5) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores[:, :3], np.array([0, 0, 1]), 5) is None  # fewer than 5 classes


def test_ece_by_hand():
    confidence = np.array([0.9, 0.8, 0.58, 0.55])
    correct = np.array([True, False, True, False])
    # bins of width 1/15: 0.9 alone (|1 - 0.9|), 0.8 alone (|0 - 0.8|), 0.58 and 0.55 together
    # (accuracy 0.5, confidence 0.565): 0.1/4 + 0.8/4 + 2/4 * 0.065 = 0.2575
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.2575)
    bins = calibration_bins(confidence, correct)
    used = [b for b in bins if b["count"]]
    assert len(bins) == 15 and [b["count"] for b in used] == [2, 1, 1]
    assert used[0]["lo"] == pytest.approx(8 / 15) and used[0]["accuracy"] == 0.5
    assert used[0]["confidence"] == pytest.approx(0.565)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([True, False])) == 0.0


def test_temperature_by_hand():
    # Two classes, logits (2, 0) for every row, 3 of 4 rows truly class 0: the best probability for
    # class 0 is 0.75, so 2 / T = ln 3 and T = 2 / ln 3.
    logits = np.array([[2.0, 0.0]] * 4)
    truth = np.array([0, 0, 0, 1])
    t = fit_temperature(nll_of(logits, truth, False))
    assert t == pytest.approx(2 / math.log(3), rel=1e-6)
    nll = -(3 * math.log(0.75) + math.log(0.25)) / 4
    assert nll_of(logits, truth, False)(t) == pytest.approx(nll, rel=1e-9)
    # sigmoid models: always right, so the sharpest temperature allowed
    z = np.array([[1.5]] * 4)
    assert fit_temperature(nll_of(z, np.array([0, 0, 0, 0]), True)) < 0.011
    two = np.array([[1.5, -1.5]] * 4)
    # class 0 positive in 3 rows, class 1 positive in 1: both are the same 3-of-4 problem,
    # sigmoid(1.5 / T) = 0.75; the NLL sums both classes' binary cross-entropies
    t_sig = fit_temperature(nll_of(two, np.array([0, 0, 0, 1]), True))
    assert t_sig == pytest.approx(1.5 / math.log(3), rel=1e-6)
    assert nll_of(two, np.array([0, 0, 0, 1]), True)(t_sig) == pytest.approx(2 * nll, rel=1e-9)


def nll_of(logits, truth, sigmoid):
    return lambda t: negative_log_likelihood(probabilities(logits, sigmoid, t), truth, sigmoid)


def test_report_names():
    scores = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.59, 0.31], [0.2, 0.5, 0.3], [0.59, 0.3, 0.11]])
    r = classification_report(scores, TRUTH, CLASSES)
    assert r["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert r["n"] == 5 and r["top1"] == r["acc1"] == pytest.approx(0.6) and r["acc5"] is None
    assert r["mean_per_class_recall"] == pytest.approx(0.5)
    # confidences 0.7 0.5 0.59 0.5 0.59, right: T F T T F -> bins (7/15, 8/15] {0.5, 0.5: acc 0.5},
    # (8/15, 9/15] {0.59, 0.59: acc 0.5}, (10/15, 11/15] {0.7: acc 1}
    assert r["ece"] == pytest.approx(2 / 5 * 0.0 + 2 / 5 * 0.09 + 1 / 5 * 0.3)
