"""Prompts -> the zero-shot head: one L2-normalized text embedding per class, per model.

A class's embedding is the normalized mean of its normalized prompt embeddings
(CLIP's prompt ensemble; with a single template per class this is exactly
open_clip's ``build_zero_shot_classifier``). Which sentences a class gets is
decided in prompts.py; what the head's cosines become, in scoring.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch

from clipbatch.model.load import LoadedModel
from clipbatch.model.members import Member

TEXT_BATCH = 1024  # prompts per encode_text call: CuPL-style files can hold 50k sentences


def build_heads(members: list[Member], prompts: list[list[str]], device: str = "auto",
                load: Callable[[Member], LoadedModel] | None = None) -> tuple[list[Member], list[np.ndarray]]:
    """Each member's text head [C, D], and the members with what their loaded models say
    (precision, logit scale and bias, embedding size). The models are loaded one after the other,
    by ``load`` where given (relabel checks them against the output), else on the device."""
    ran, heads = [], []
    for member in members:
        loaded = load(member) if load else member.load(device)
        heads.append(build_text_head(loaded, prompts))
        ran.append(member.ran_with(loaded, heads[-1].shape[1]))
        del loaded
    return ran, heads


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
    token cannot change the result: it is cut off (short templates need a fraction of the 77
    positions; equal to the full context within float rounding, tests/unit/test_prompts.py).
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
