"""Classification metrics on a labeled set, in plain numpy, named as CLIP_benchmark names them.

Inputs are a probability (or logit) matrix [N, C] in class order and true class
indices [N]; nothing here reads files, so every number can be checked by hand.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

ECE_BINS = 15


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts: rows are the true class, columns the predicted one."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def top_k_accuracy(scores: np.ndarray, truth: np.ndarray, k: int) -> float | None:
    """Share of rows whose true class is among the k best; None when there are fewer than k classes
    (CLIP_benchmark reports acc5 as NaN then, since top-5 of 3 classes is always right)."""
    if scores.shape[1] < k:
        return None
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((best == truth[:, None]).any(axis=1).mean())


def per_class(confusion: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """{class: {n, precision, recall, f1}}; a score whose denominator is 0 is 0 (as scikit-learn's
    zero_division=0), so a class never predicted has precision 0."""
    tp = np.diag(confusion).astype(float)
    n = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    result = {}
    for i, name in enumerate(classes):
        precision = tp[i] / predicted[i] if predicted[i] else 0.0
        recall = tp[i] / n[i] if n[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result[name] = {"n": int(n[i]), "precision": precision, "recall": recall, "f1": f1}
    return result


def mean_per_class_recall(confusion: np.ndarray) -> float:
    """Mean recall over the classes that have examples (scikit-learn's balanced accuracy, which
    CLIP_benchmark reports as mean_per_class_recall)."""
    n = confusion.sum(axis=1)
    present = n > 0
    return float((np.diag(confusion)[present] / n[present]).mean())


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins (lo, hi] (the first also holds 0): count, mean confidence and
    accuracy per bin, for the ECE and the reliability diagram."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
                      "confidence": float(confidence[members].mean()) if count else None,
                      "accuracy": float(correct[members].mean()) if count else None})
    return table


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum over bins of |accuracy - confidence| weighted by the bin's share of rows (Guo et al. 2017)."""
    n = len(confidence)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in calibration_bins(confidence, correct, bins) if b["count"]))


def negative_log_likelihood(probs: np.ndarray, truth: np.ndarray, sigmoid: bool) -> float:
    """Mean NLL of the true classes: -log p(true class), or for sigmoid models the one-vs-rest
    binary cross-entropy summed over classes. Works on probabilities, so that it serves a mixture
    of models as well as one."""
    p = np.clip(probs.astype(np.float64), 1e-300, 1.0)
    rows = np.arange(len(truth))
    if not sigmoid:
        return float(-np.log(p[rows, truth]).mean())
    positive = np.zeros(p.shape, bool)
    positive[rows, truth] = True
    return float(-np.where(positive, np.log(p), np.log1p(-np.minimum(p, 1 - 1e-16))).sum(axis=1).mean())


def fit_temperature(nll_at: Callable[[float], float]) -> float:
    """The temperature T in [0.01, 100] minimizing nll_at(T).

    For one model the NLL is convex in 1/T (cross-entropy is convex in the logits, which are
    linear in 1/T), so a golden-section search over log(1/T) finds the minimum without an
    optimizer library; for a mixture of models it finds a local one.
    """
    lo, hi = math.log(1e-2), math.log(1e2)
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_beta: float) -> float:
        return nll_at(math.exp(-log_beta))

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return math.exp(-(lo + hi) / 2)


def classification_report(scores: np.ndarray, truth: np.ndarray, classes: list[str]) -> dict:
    """Everything metrics.json holds about one score matrix, under both clipbatch's and
    CLIP_benchmark's names (acc1 = top1, acc5 = top5)."""
    predicted = scores.argmax(axis=1)
    confusion = confusion_matrix(truth, predicted, len(classes))
    confidence = scores.max(axis=1)
    correct = predicted == truth
    top1 = float(correct.mean())
    top5 = top_k_accuracy(scores, truth, 5)
    mpcr = mean_per_class_recall(confusion)
    return {"n": int(len(truth)), "top1": top1, "top5": top5, "acc1": top1, "acc5": top5,
            "mean_per_class_recall": mpcr, "ece": expected_calibration_error(confidence, correct),
            "per_class": per_class(confusion, classes), "confusion": confusion.tolist(),
            "reliability": calibration_bins(confidence, correct)}
