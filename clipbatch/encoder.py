"""The inference actor: model on its device, normalization and precision there, scores out.

Ray Data calls it with batches of uint8 pixels from the decode stage; the
constructor loads the model once per actor. There is nothing Ray-specific in
here, so tests call it directly.
"""

from __future__ import annotations

import os
import platform

import numpy as np
import pyarrow as pa
import torch

from clipbatch.decode import FAILED_SIZE, NO_ERROR
from clipbatch.labels import class_probabilities, confident_labels, top_k
from clipbatch.models import comparable_preprocess, load_model
from clipbatch.schema import fixed_size_lists, output_schema, variable_lists


class ClipEncoder:
    """Callable for ``map_batches``: {id, source, width, height, pixels, error} -> output rows."""

    def __init__(self, model_name: str, pretrained: str | None, device: str, precision: str,
                 text_head: np.ndarray, classes: list[str], logit_scale: float, logit_bias: float | None,
                 top_k: int, embedding_dtype: str | None, batch_size: int, torch_threads: int | None = None,
                 expected_preprocess: dict | None = None, carried: list[str] = (), temperature: float = 1.0,
                 min_score: float | None = None, unknown: str | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.loaded = load_model(model_name, pretrained, device=device, precision=precision)
        actual = comparable_preprocess(self.loaded.preprocess_cfg)
        if expected_preprocess is not None and actual != expected_preprocess:
            raise RuntimeError(f"images were prepared for {expected_preprocess} but the loaded model expects "
                               f"{actual}; please report this with the model name")
        self.device = self.loaded.device
        self.classes = np.asarray(classes, dtype=object)
        self.top_k = top_k
        self.embedding_dtype = embedding_dtype
        self.carried = list(carried)
        self.temperature, self.min_score, self.unknown = temperature, min_score, unknown
        self.use_text_head(text_head, logit_scale, logit_bias)
        cfg = self.loaded.preprocess_cfg
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        self.input_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.loaded.precision,
                                                                                torch.float32)
        name = torch.cuda.get_device_name() if self.device == "cuda" else platform.processor() or "cpu"
        print(f"clipbatch encoder on {platform.node()} (pid {os.getpid()}): device {self.device} ({name}), "
              f"precision {self.loaded.precision}, batch size {batch_size}, torch threads "
              f"{torch.get_num_threads()}", flush=True)

    def use_text_head(self, text_head: np.ndarray, logit_scale: float, logit_bias: float | None) -> None:
        """Called once the model is loaded (a subclass may wait here for a head computed elsewhere)."""
        self.text_head = torch.from_numpy(np.array(text_head, dtype=np.float32)).to(self.device)
        self.logit_scale, self.logit_bias = logit_scale, logit_bias
        self.schema = output_schema(len(self.classes), self.text_head.shape[1], self.embedding_dtype,
                                    carried=self.carried)

    def embed(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> L2-normalized float32 embeddings [B, D] on the device."""
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        x = ((x - self.mean) / self.std).to(self.input_dtype)
        with torch.inference_mode():
            # Normalized in float32, so that fp16/bf16 embeddings still have unit norm.
            return torch.nn.functional.normalize(self.loaded.model.encode_image(x).float(), dim=-1)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = batch["error"].astype(str)
        valid = errors == NO_ERROR
        n, num_classes = len(errors), len(self.classes)
        dim = self.text_head.shape[1]
        embeddings = np.zeros((n, dim), dtype=np.float32)
        probs = np.zeros((n, num_classes), dtype=np.float32)
        k = min(self.top_k, num_classes)
        top_values = np.zeros((n, k), dtype=np.float32)
        top_indices = np.zeros((n, k), dtype=np.int64)
        if valid.any():
            emb = self.embed(np.ascontiguousarray(batch["pixels"][valid]))
            p = class_probabilities(emb @ self.text_head.T, self.logit_scale, self.logit_bias, self.temperature)
            top_values[valid], top_indices[valid] = top_k(p, k)
            embeddings[valid] = emb.cpu().numpy()
            probs[valid] = p.cpu().numpy()
        no_size = ~valid | (batch["width"] == FAILED_SIZE)
        labels = confident_labels(self.classes, top_indices[:, 0], top_values[:, 0], self.min_score,
                                             self.unknown)
        columns = {
            "id": pa.array(batch["id"].astype(str), pa.string()),
            "source": pa.array(batch["source"].astype(str), pa.string()),
            "width": pa.array(batch["width"], pa.int32(), mask=no_size),
            "height": pa.array(batch["height"], pa.int32(), mask=no_size),
            "label": pa.array(labels, pa.string(), mask=~valid),
            "score": pa.array(top_values[:, 0], pa.float32(), mask=~valid),
            "top_labels": variable_lists(self.classes[top_indices], valid, pa.string()),
            "top_scores": variable_lists(top_values, valid, pa.float32()),
            "scores": fixed_size_lists(probs, valid, pa.float32()),
        }
        if self.embedding_dtype:
            columns["embedding"] = fixed_size_lists(embeddings.astype(self.embedding_dtype), valid,
                                                    self.schema.field("embedding").type.value_type)
        columns["error"] = pa.array(errors, pa.string(), mask=valid)
        for name in self.carried:
            # A column that is missing everywhere comes back from Ray's Arrow/numpy round trip as NaNs.
            columns[name] = pa.array([None if v is None or v != v else str(v) for v in batch[name]], pa.string())
        return pa.Table.from_pydict(columns, schema=self.schema)
