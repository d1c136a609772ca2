"""Prompts -> the zero-shot head (one text embedding per class), and head x image embeddings -> scores.

A class's embedding is the normalized mean of its normalized prompt embeddings
(CLIP's prompt ensemble; with a single template per class this is exactly
open_clip's ``build_zero_shot_classifier``). Which sentences a class gets is
decided in templates.py.
"""

from __future__ import annotations

import numpy as np
import torch

TEXT_BATCH = 1024  # prompts per encode_text call: CuPL-style files can hold 50k sentences


def build_text_head(loaded, prompts: list[list[str]]) -> np.ndarray:
    """[C, D] float32, L2-normalized rows, in class order; prompts[c] are class c's sentences."""
    flat = [s for sentences in prompts for s in sentences]
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(flat), TEXT_BATCH):
            tokens = loaded.tokenizer(flat[start:start + TEXT_BATCH]).to(loaded.device)
            chunks.append(torch.nn.functional.normalize(loaded.model.encode_text(tokens).float(), dim=-1))
    embedded = torch.cat(chunks)
    bounds = np.cumsum([0] + [len(s) for s in prompts])
    head = torch.stack([embedded[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])
    return torch.nn.functional.normalize(head, dim=-1).cpu().numpy()


def class_probabilities(cosine: torch.Tensor, logit_scale: float, logit_bias: float | None,
                        temperature: float = 1.0) -> torch.Tensor:
    """The model's own zero-shot probabilities from cosine similarities [B, C].

    CLIP: softmax over classes of logit_scale * cos. SigLIP-style models (with a
    logit_bias) score each class independently: sigmoid(scale * cos + bias). A
    temperature (labels.temperature, fitted by ``clipbatch eval --calibrate``)
    divides the logits; 1.0 leaves the model's own probabilities.
    """
    logits = logit_scale * cosine.float()
    if logit_bias is not None:
        return torch.sigmoid((logits + logit_bias) / temperature)
    return torch.softmax(logits / temperature, dim=-1)


def member_logits(embeddings: dict[str, np.ndarray], heads: dict[str, np.ndarray], members: list[dict]) -> list:
    """Per model of a job (see evaluate.job_members): logit_scale * cos(stored embedding, class)
    (+ logit_bias), at temperature 1, in float64. Stored embeddings are L2-normalized, so no image
    is read; float16 storage moves the scores by about 1e-4."""
    return [m["logit_scale"] * embeddings[m["embedding_column"]].astype(np.float64)
            @ heads[m["embedding_column"]].T.astype(np.float64) + (m["logit_bias"] or 0.0) for m in members]


def scores_from_logits(logits: list[np.ndarray], members: list[dict], temperature: float = 1.0) -> np.ndarray:
    """[N, C] the job's scores from its models' logits: the weighted mean of their probabilities
    (one model: its own probabilities), by the same rule as class_probabilities, in numpy."""
    from clipbatch.metrics import probabilities

    total = sum(m["weight"] for m in members)
    return sum(m["weight"] / total * probabilities(z, m["logit_bias"] is not None, temperature)
               for z, m in zip(logits, members))


def top_k(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return values.cpu().numpy(), indices.cpu().numpy()


def confident_labels(classes: np.ndarray, top1: np.ndarray, score: np.ndarray, min_score: float | None,
                     unknown: str | None) -> np.ndarray:
    """The top-1 class, or ``unknown`` (None: a null label) where its score is below
    labels.min_score. Only the label changes; the scores stay the model's."""
    labels = classes[top1].astype(object)
    if min_score is not None:
        labels[score < min_score] = unknown
    return labels
