"""Prompts -> the zero-shot head (one text embedding per class), and head x image embeddings -> scores.

A class's embedding is the normalized mean of its normalized prompt embeddings
(CLIP's prompt ensemble; with a single template per class this is exactly
open_clip's ``build_zero_shot_classifier``). Which sentences a class gets is
decided in templates.py.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

TEXT_BATCH = 1024  # prompts per encode_text call: CuPL-style files can hold 50k sentences


def build_text_head(loaded, prompts: list[list[str]]) -> np.ndarray:
    """[C, D] float32, L2-normalized rows, in class order; prompts[c] are class c's sentences."""
    flat = [s for sentences in prompts for s in sentences]
    tokens = loaded.tokenizer(flat)
    # Shortest prompts first, so that each batch is cut to about its own length (see encode_text).
    order = torch.argsort((tokens != 0).sum(-1), stable=True)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(flat), TEXT_BATCH):
            batch = tokens[order[start:start + TEXT_BATCH]].to(loaded.device)
            chunks.append(torch.nn.functional.normalize(encode_text(loaded.model, batch).float(), dim=-1))
    in_order = torch.cat(chunks)
    embedded = torch.empty_like(in_order)
    embedded[order.to(embedded.device)] = in_order
    bounds = np.cumsum([0] + [len(s) for s in prompts])
    head = torch.stack([embedded[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])
    return torch.nn.functional.normalize(head, dim=-1).cpu().numpy()


def encode_text(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's own ``encode_text``, run on the prompts' length instead of the full context.

    A CLIP text tower with a causal mask computes each position from the positions before it
    only, and pools at the end-of-text token, so the padding after the longest prompt's last
    token cannot change the result: it is cut off (77 -> about 10 positions for short templates,
    5-7x less work; equal to the full context within float rounding, tests/test_templates.py).
    Towers without a causal mask (SigLIP-style, Hugging Face) always get the full context.
    """
    length = _prompt_length(model, tokens)
    if length is None or length >= tokens.shape[1]:
        return model.encode_text(tokens)
    with _context_cut_to(model, length):
        return model.encode_text(tokens[:, :length])


def _prompt_length(model, tokens: torch.Tensor) -> int | None:
    """Positions up to the last prompt's pooling token, or None where cutting is not exact."""
    import open_clip

    mask = getattr(model, "attn_mask", None)
    pool = getattr(model, "text_pool_type", None)
    if not isinstance(model, open_clip.CLIP) or mask is None or pool not in ("argmax", "eos") \
            or tokens.ndim != 2 or tokens.shape[1] != mask.shape[0]:
        return None
    causal = torch.full(mask.shape, float("-inf"), dtype=mask.dtype, device=mask.device).triu_(1)
    if not torch.equal(mask, causal):
        return None
    pooled_at = tokens.argmax(-1) if pool == "argmax" else (tokens == model.text_eos_id).int().argmax(-1)
    return int(pooled_at.max()) + 1


@contextmanager
def _context_cut_to(model, length: int):
    """The model's positional embedding and causal mask cut to the first ``length`` positions,
    restored afterwards."""
    positions, mask = model.positional_embedding, model.attn_mask
    model.positional_embedding = torch.nn.Parameter(positions[:length], requires_grad=False)
    model.attn_mask = mask[:length, :length]
    try:
        yield
    finally:
        model.positional_embedding, model.attn_mask = positions, mask


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
    """Per model of a job (see stored.job_members): logit_scale * cos(stored embedding, class)
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


def label_columns(probs: torch.Tensor, valid: np.ndarray, classes: pa.Array, k: int,
                  min_score: float | None = None, unknown: str | None = None) -> dict[str, pa.Array]:
    """The output's label, score, top_labels, top_scores and scores columns for n rows.

    probs [n_valid, C] are the class probabilities of the rows where valid is True; the other
    rows get nulls. Below min_score the label is ``unknown`` (None: null) while the scores stay
    the model's. A job's encoders and ``clipbatch relabel`` both label here, so the two give the
    same numbers for the same probabilities.
    """
    from clipbatch.schema import fixed_size_lists

    n, num_classes = len(valid), len(classes)
    k = min(k, num_classes)
    all_probs = np.zeros((n, num_classes), dtype=np.float32)
    top_values = np.zeros((n, k), dtype=np.float32)
    top_indices = np.zeros((n, k), dtype=np.int64)
    if valid.any():
        values, indices = probs.topk(k, dim=-1)
        top_values[valid], top_indices[valid] = values.cpu().numpy(), indices.cpu().numpy()
        all_probs[valid] = probs.cpu().numpy()
    invalid = pa.array(~valid)
    unsure = valid & (top_values[:, 0] < min_score) if min_score is not None else np.zeros(n, dtype=bool)
    label = classes.take(pa.array(top_indices[:, 0], mask=~valid | unsure))
    if unknown is not None and unsure.any():
        label = pc.if_else(pa.array(unsure), pa.scalar(unknown, pa.string()), label)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
    return {
        "label": label,
        "score": pa.array(top_values[:, 0], pa.float32(), mask=~valid),
        "top_labels": pa.ListArray.from_arrays(offsets, classes.take(top_indices.reshape(-1)), mask=invalid),
        "top_scores": pa.ListArray.from_arrays(offsets, pa.array(top_values.reshape(-1)), mask=invalid),
        "scores": fixed_size_lists(all_probs, valid, pa.float32()),
    }
