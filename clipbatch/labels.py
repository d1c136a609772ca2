"""Classes and prompt templates -> the zero-shot head (one text embedding per class).

A class's embedding is the normalized mean of its normalized template
embeddings (CLIP's prompt ensemble), computed by open_clip's own
``build_zero_shot_classifier`` once per job.
"""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import torch

from clipbatch.config import LabelsSpec, SpecError


def _builtin_template_sets() -> dict[str, list[str]]:
    from open_clip import zero_shot_metadata as meta

    def as_strings(templates) -> list[str]:
        return [t("{}") for t in templates]

    return {
        "openai": as_strings(meta.OPENAI_IMAGENET_TEMPLATES),
        "simple": ["a photo of a {}."],
        "simple-imagenet": as_strings(meta.SIMPLE_IMAGENET_TEMPLATES),
    }


def template_set_names() -> list[str]:
    return list(_builtin_template_sets())


def resolve_templates(templates: str | list[str]) -> list[str]:
    if isinstance(templates, str):
        return _builtin_template_sets()[templates]
    return list(templates)


def resolve_classes(labels: LabelsSpec, storage_options: dict | None = None) -> list[str]:
    """The class list, from the spec or from a one-class-per-line file (any fsspec URL)."""
    if labels.classes is not None:
        return list(labels.classes)
    try:
        with fsspec.open(labels.classes_file, "r", encoding="utf-8", **(storage_options or {})) as f:
            classes = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        raise SpecError(f"labels.classes_file: {labels.classes_file} not found") from None
    if not classes:
        raise SpecError(f"labels.classes_file: {labels.classes_file} holds no classes")
    if len(set(classes)) != len(classes):
        raise SpecError(f"labels.classes_file: {labels.classes_file} has duplicate classes")
    return classes


def build_text_head(loaded, classes: list[str], templates: list[str]) -> np.ndarray:
    """[C, D] float32, L2-normalized rows, in class order."""
    from open_clip import build_zero_shot_classifier

    with torch.inference_mode():
        weights = build_zero_shot_classifier(loaded.model, loaded.tokenizer, classes, templates,
                                             num_classes_per_batch=max(1, 4096 // len(templates)),
                                             device=loaded.device)
    return weights.T.float().cpu().numpy()


def class_probabilities(cosine: torch.Tensor, logit_scale: float, logit_bias: float | None) -> torch.Tensor:
    """The model's own zero-shot probabilities from cosine similarities [B, C].

    CLIP: softmax over classes of logit_scale * cos. SigLIP-style models (with a
    logit_bias) score each class independently: sigmoid(scale * cos + bias).
    """
    logits = logit_scale * cosine.float()
    if logit_bias is not None:
        return torch.sigmoid(logits + logit_bias)
    return torch.softmax(logits, dim=-1)


def label_columns(embeddings: torch.Tensor, valid: np.ndarray, text_head: torch.Tensor, classes: pa.Array,
                  logit_scale: float, logit_bias: float | None, k: int,
                  min_score: float | None = None) -> dict[str, pa.Array]:
    """The output's label, score, top_labels, top_scores and scores columns for n rows.

    embeddings [n_valid, D] are the L2-normalized float32 embeddings of the rows where valid is
    True; the other rows get nulls. Below min_score the label is null while the scores stay. A job's encoders and ``clipbatch relabel`` both score here,
    so the two give the same numbers for the same embeddings.
    """
    from clipbatch.schema import fixed_size_lists

    n, num_classes = len(valid), len(classes)
    k = min(k, num_classes)
    probs = np.zeros((n, num_classes), dtype=np.float32)
    top_values = np.zeros((n, k), dtype=np.float32)
    top_indices = np.zeros((n, k), dtype=np.int64)
    if valid.any():
        p = class_probabilities(embeddings @ text_head.T, logit_scale, logit_bias)
        values, indices = p.topk(k, dim=-1)
        top_values[valid], top_indices[valid] = values.cpu().numpy(), indices.cpu().numpy()
        probs[valid] = p.cpu().numpy()
    invalid = pa.array(~valid)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
    return {
        "label": classes.take(pa.array(top_indices[:, 0], mask=~valid | (top_values[:, 0] < (min_score or 0.0)))),
        "score": pa.array(top_values[:, 0], pa.float32(), mask=~valid),
        "top_labels": pa.ListArray.from_arrays(offsets, classes.take(top_indices.reshape(-1)), mask=invalid),
        "top_scores": pa.ListArray.from_arrays(offsets, pa.array(top_values.reshape(-1)), mask=invalid),
        "scores": fixed_size_lists(probs, valid, pa.float32()),
    }
