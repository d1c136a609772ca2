"""Cosines -> the model's probabilities -> the output's label columns, written once for the job, relabel and eval.

Probabilities are the model's own zero-shot probabilities: softmax over classes
of ``logit_scale * cosine`` for CLIP models, ``sigmoid(logit_scale * cosine +
logit_bias)`` per class for SigLIP-style models, the logits divided by
``labels.temperature``. An ensemble's scores are the weighted mean of its
members' probabilities. Everything here is numpy, so the same numbers come out
of an encoder on a GPU, of relabel over stored embeddings and of eval.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipbatch.model.members import Member
from clipbatch.spec import LabelsSpec


@dataclass(frozen=True)
class Labeling:
    """How probabilities become labels: the classes, top_k, and the min_score threshold."""

    classes: list[str]
    top_k: int = 5
    min_score: float | None = None
    unknown: str | None = None      # the label below min_score (None: null)
    temperature: float = 1.0

    @classmethod
    def from_spec(cls, labels: LabelsSpec, classes: list[str]) -> "Labeling":
        return cls(classes, labels.top_k, labels.min_score, labels.unknown, labels.temperature)

    @functools.cached_property
    def class_array(self) -> pa.Array:
        """The class names as Arrow strings, made once: every batch takes its labels from them."""
        return pa.array(self.classes, pa.string())


def probabilities(logits: np.ndarray, sigmoid: bool, temperature: float = 1.0) -> np.ndarray:
    """[N, C] probabilities from logits, in the logits' float dtype."""
    z = logits / temperature
    if sigmoid:
        return 1 / (1 + np.exp(-z))
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def logits(cosine: np.ndarray, member: Member) -> np.ndarray:
    """A member's logits from cosines [N, C]: logit_scale * cosine (+ logit_bias)."""
    return member.logit_scale * cosine + (member.logit_bias or 0.0)


def mix(member_logits: list[np.ndarray], members: list[Member], temperature: float = 1.0) -> np.ndarray:
    """The job's scores: its members' probabilities averaged with their weights (one model: its own)."""
    total = sum(m.weight for m in members)
    return sum(m.weight / total * probabilities(z, m.logit_bias is not None, temperature)
               for z, m in zip(member_logits, members))


def fixed_size_lists(values: np.ndarray, valid: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """[N, K] numpy (rows for invalid entries may be anything) -> fixed_size_list<K>, null where not valid."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=pa.array(~valid))


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) [N, k] of the k largest probabilities of each row, best first."""
    if k < probs.shape[1]:
        candidates = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(probs.shape[1]), probs.shape)
    values = np.take_along_axis(probs, candidates, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(candidates, order, axis=1)


def label_columns(probs: np.ndarray, valid: np.ndarray, labeling: Labeling) -> dict[str, pa.Array]:
    """The output's label, score, top_labels, top_scores and scores columns for n rows.

    probs [n_valid, C] are the probabilities of the rows where valid is True; the other rows get
    nulls. Below min_score the label is ``unknown`` (None: null) while the scores stay the model's.
    """
    classes = labeling.class_array
    n, num_classes = len(valid), len(classes)
    k = min(labeling.top_k, num_classes)
    all_probs = np.zeros((n, num_classes), dtype=np.float32)
    top_values = np.zeros((n, k), dtype=np.float32)
    top_indices = np.zeros((n, k), dtype=np.int64)
    if valid.any():
        top_values[valid], top_indices[valid] = top_k(probs, k)
        all_probs[valid] = probs
    invalid = pa.array(~valid)
    unsure = valid & (top_values[:, 0] < labeling.min_score) if labeling.min_score is not None \
        else np.zeros(n, dtype=bool)
    label = classes.take(pa.array(top_indices[:, 0], mask=~valid | unsure))
    if labeling.unknown is not None and unsure.any():
        label = pc.if_else(pa.array(unsure), pa.scalar(labeling.unknown, pa.string()), label)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
    return {
        "label": label,
        "score": pa.array(top_values[:, 0], pa.float32(), mask=~valid),
        "top_labels": pa.ListArray.from_arrays(offsets, classes.take(top_indices.reshape(-1)), mask=invalid),
        "top_scores": pa.ListArray.from_arrays(offsets, pa.array(top_values.reshape(-1)), mask=invalid),
        "scores": fixed_size_lists(all_probs, valid, pa.float32()),
    }
