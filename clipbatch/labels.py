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


def scores_from_embeddings(embeddings: np.ndarray, head: np.ndarray, logit_scale: float,
                           logit_bias: float | None, temperature: float = 1.0) -> np.ndarray:
    """[N, C] probabilities from stored (L2-normalized) embeddings and a text head, without
    touching an image: what eval's template comparison does for every template set."""
    cosine = torch.from_numpy(np.asarray(embeddings, np.float32)) @ torch.from_numpy(
        np.asarray(head, np.float32)).T
    return class_probabilities(cosine, logit_scale, logit_bias, temperature).numpy()


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
