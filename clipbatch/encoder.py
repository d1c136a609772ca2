"""The inference actor: model(s) on its device, normalization and precision there, scores out.

Ray Data calls it with batches of uint8 pixels from the decode stage; the
constructor loads the model once per actor. An ensemble's actor holds all its
models and averages their probabilities with the members' weights (one pool of
such actors, not one pool per model: see README, "Ensembles"). There is nothing
Ray-specific in here, so tests call it directly.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from clipbatch.decode import FAILED_SIZE, NO_ERROR
from clipbatch.labels import class_probabilities, label_columns
from clipbatch.models import comparable_preprocess, load_model
from clipbatch.schema import fixed_size_lists, output_schema


@dataclass
class Member:
    """One model of the job, as the actor needs it (a single-model job has one, of weight 1)."""

    model_name: str                 # resolved open_clip name
    pretrained: str | None
    precision: str
    weight: float = 1.0             # normalized over the members by the encoder
    embedding_column: str = "embedding"
    pixels_column: str = "pixels"   # which decoded size it takes (ensembles of different input sizes)
    expected_preprocess: dict | None = None


class _Loaded:
    """A member's model on the device with its normalization constants and text head."""

    def __init__(self, member: Member, device: str):
        self.member = member
        self.loaded = load_model(member.model_name, member.pretrained, device=device, precision=member.precision)
        actual = comparable_preprocess(self.loaded.preprocess_cfg)
        if member.expected_preprocess is not None and actual != member.expected_preprocess:
            raise RuntimeError(f"images were prepared for {member.expected_preprocess} but the loaded model expects "
                               f"{actual}; please report this with the model name")

    def set_head(self, head: dict) -> None:
        self.text_head = torch.from_numpy(np.array(head["text_head"], dtype=np.float32)).to(self.loaded.device)
        self.logit_scale, self.logit_bias = head["logit_scale"], head["logit_bias"]

    def embed(self, pixels: np.ndarray) -> torch.Tensor:
        return embed_images(self.loaded, pixels)


class ClipEncoder:
    """Callable for ``map_batches``: {id, source, width, height, pixels[, pixels_1...], error} -> output rows.

    heads: per member {text_head [C, D], logit_scale, logit_bias}, in member order.
    node: where this actor runs, for its start-up line (default: the host name).
    lanes: how many batches Ray Data calls it with at once, from as many threads (nothing in a
    call writes to the encoder, so the calls share its models).
    """

    def __init__(self, members: list[Member], device: str, heads, classes: list[str], top_k: int,
                 embedding_dtype: str | None, batch_size: int, torch_threads: int | None = None,
                 carried: list[str] = (), temperature: float = 1.0, min_score: float | None = None,
                 unknown: str | None = None, node: str | None = None, lanes: int = 1):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.models = [_Loaded(m, device) for m in members]
        total = sum(m.weight for m in members)
        self.weights = [m.weight / total for m in members]
        self.device = self.models[0].loaded.device
        self.classes = pa.array(classes, pa.string())
        self.top_k = top_k
        self.embedding_dtype = embedding_dtype
        self.carried = list(carried)
        self.temperature, self.min_score, self.unknown = temperature, min_score, unknown
        self.use_text_heads(heads)
        name = torch.cuda.get_device_name() if self.device == "cuda" else platform.processor() or "cpu"
        models = ", ".join(f"{m.member.model_name} ({m.loaded.precision})" for m in self.models)
        print(f"clipbatch encoder on {node or platform.node()} (pid {os.getpid()}): device {self.device} ({name}), "
              f"{models}, batch size {batch_size}, "
              + (f"{lanes} lanes of {torch.get_num_threads()} torch thread(s)" if lanes > 1 else
                 f"torch threads {torch.get_num_threads()}"), flush=True)

    def use_text_heads(self, heads) -> None:
        """Called once the models are loaded (a subclass may wait here for heads computed elsewhere)."""
        for model, head in zip(self.models, heads):
            model.set_head(head)
        self.schema = output_schema(len(self.classes), {m.member.embedding_column: m.text_head.shape[1]
                                                        for m in self.models}, self.embedding_dtype,
                                    carried=self.carried)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = batch["error"].astype(str)
        valid = errors == NO_ERROR
        n = len(errors)
        embeddings = {m.member.embedding_column: np.zeros((n, m.text_head.shape[1]), dtype=np.float32)
                      for m in self.models}
        probs = torch.zeros((0, len(self.classes)))
        if valid.any():
            probs = 0
            for model, weight in zip(self.models, self.weights):
                emb = model.embed(np.ascontiguousarray(batch[model.member.pixels_column][valid]))
                probs = probs + weight * class_probabilities(emb @ model.text_head.T, model.logit_scale,
                                                             model.logit_bias, self.temperature)
                embeddings[model.member.embedding_column][valid] = emb.cpu().numpy()
        no_size = ~valid | (batch["width"] == FAILED_SIZE)
        columns = {
            "id": pa.array(batch["id"].astype(str), pa.string()),
            "source": pa.array(batch["source"].astype(str), pa.string()),
            "width": pa.array(batch["width"], pa.int32(), mask=no_size),
            "height": pa.array(batch["height"], pa.int32(), mask=no_size),
            **label_columns(probs, valid, self.classes, self.top_k, self.min_score, self.unknown),
        }
        if self.embedding_dtype:
            for name, values in embeddings.items():
                columns[name] = fixed_size_lists(values.astype(self.embedding_dtype), valid,
                                                 self.schema.field(name).type.value_type)
        columns["error"] = pa.array(errors, pa.string(), mask=valid)
        for name in self.carried:
            # A column that is missing everywhere comes back from Ray's Arrow/numpy round trip as NaNs.
            columns[name] = pa.array([None if v is None or v != v else str(v) for v in batch[name]], pa.string())
        return pa.Table.from_pydict(columns, schema=self.schema)


def embed_images(loaded, pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> L2-normalized float32 embeddings [B, D]: the model's mean/std
    normalization and precision applied on its device (the decode workers never load torch)."""
    cfg = loaded.preprocess_cfg
    mean = torch.tensor(cfg["mean"], device=loaded.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=loaded.device).view(1, 3, 1, 1)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(loaded.precision, torch.float32)
    x = torch.from_numpy(pixels).to(loaded.device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    x = ((x - mean) / std).to(dtype)
    with torch.inference_mode():
        # Normalized in float32, so that fp16/bf16 embeddings still have unit norm.
        return torch.nn.functional.normalize(loaded.model.encode_image(x).float(), dim=-1)
