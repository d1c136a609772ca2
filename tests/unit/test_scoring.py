"""Cosines -> probabilities -> label columns: the one copy the job, relabel and eval share."""

from __future__ import annotations

import numpy as np
import pytest

from clipbatch.model.members import Member
from clipbatch.model.scoring import Labeling, label_columns, logits, mix, probabilities, top_k

CLIP = Member("a", logit_scale=100.0)
SIGLIP = Member("b", logit_scale=10.0, logit_bias=-2.0)


def test_temperature_divides_logits():
    cosine = np.array([[0.30, 0.25, 0.10]])
    p1 = probabilities(logits(cosine, CLIP), sigmoid=False)[0]
    p2 = probabilities(logits(cosine, CLIP), sigmoid=False, temperature=2.0)[0]
    assert np.allclose(p2, np.exp([15.0, 12.5, 5.0]) / np.exp([15.0, 12.5, 5.0]).sum(), atol=1e-6)
    assert np.allclose(np.log(p1[0] / p1[1]), 2 * np.log(p2[0] / p2[1]), atol=1e-4)
    sig = probabilities(logits(cosine, SIGLIP), sigmoid=True, temperature=0.5)[0]
    assert np.allclose(sig, 1 / (1 + np.exp(-(10.0 * np.array([0.30, 0.25, 0.10]) - 2.0) / 0.5)), atol=1e-6)


def test_softmax_is_stable_and_keeps_the_dtype():
    z = np.array([[1000.0, 999.0, -1000.0]], np.float32)
    p = probabilities(z, sigmoid=False)
    assert p.dtype == np.float32 and np.isfinite(p).all() and p.sum() == pytest.approx(1.0)


def test_mix_is_the_weighted_mean_of_each_models_probabilities():
    rng = np.random.default_rng(0)
    cos_a, cos_b = rng.uniform(-1, 1, (4, 3)), rng.uniform(-1, 1, (4, 3))
    a, b = Member("a", weight=3.0, logit_scale=50.0), Member("b", weight=1.0, logit_scale=10.0, logit_bias=-1.0)
    mixed = mix([logits(cos_a, a), logits(cos_b, b)], [a, b])
    expected = 0.75 * probabilities(50 * cos_a, False) + 0.25 / (1 + np.exp(-(10 * cos_b - 1)))
    assert np.allclose(mixed, expected)
    assert np.allclose(mix([logits(cos_a, a)], [a]), probabilities(50 * cos_a, False))  # one model: its own


def test_top_k_matches_a_full_sort():
    probs = np.random.default_rng(1).random((50, 40))
    for k in (1, 5, 40):
        values, indices = top_k(probs, k)
        order = np.argsort(-probs, axis=1)[:, :k]
        assert np.array_equal(indices, order) and np.allclose(values, np.take_along_axis(probs, order, 1))


def test_label_columns_threshold_and_invalid_rows():
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], np.float32)  # the valid rows only
    valid = np.array([True, False, True])
    columns = label_columns(probs, valid, Labeling(["cat", "dog", "car"], top_k=2, min_score=0.5, unknown="other"))
    assert columns["label"].to_pylist() == ["cat", None, "other"]
    scores = columns["score"].to_pylist()
    assert scores[1] is None and scores[0] == pytest.approx(0.7) and scores[2] == pytest.approx(0.4)
    assert columns["top_labels"].to_pylist() == [["cat", "dog"], None, ["cat", "dog"]]
    assert columns["scores"].to_pylist()[1] is None and np.allclose(columns["scores"].to_pylist()[2], probs[1])
    plain = label_columns(probs, valid, Labeling(["cat", "dog", "car"], top_k=5, min_score=0.5))
    assert plain["label"].to_pylist() == ["cat", None, None] and len(plain["top_labels"].to_pylist()[0]) == 3
