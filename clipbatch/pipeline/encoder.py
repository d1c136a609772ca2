"""The inference actor: model(s) on its device, normalization and precision there, label columns out.

Ray Data calls it with batches of uint8 pixels from the decode stage; the
constructor loads the model once per actor. An ensemble's actor holds all its
models and mixes their probabilities with the members' weights (one pool of such
actors, not one pool per model). Nothing here imports Ray, so tests call it directly.
"""

from __future__ import annotations

import json
import os
import platform
import threading
from contextlib import nullcontext

import numpy as np
import pyarrow as pa
import torch

from clipbatch.model.members import Member
from clipbatch.model.scoring import Labeling, fixed_size_lists, label_columns, logits, mix
from clipbatch.pipeline.decode import FAILED_SIZE, decode_configs, pixel_size, pixels_column
from clipbatch.pipeline.rows import NO_ERROR
from clipbatch.pipeline.device_decode import device_pixels


class _Lane(threading.local):
    """What each calling thread owns on CUDA (Ray Data runs plan.concurrent_batches calls at once): a
    stream, so that one call's copy and forward overlap another's, and a pinned buffer its batch is
    staged in, which lets the copy to the GPU run without blocking."""

    stream = None
    pinned = None


class ClipEncoder:
    """Callable for ``map_batches``: {id, source, width, height, pixels[, pixels_1...], error} -> output rows.

    members: the job's models, as the text heads were built (logit scale and bias known); heads: each
    one's text head [C, D]; schema: the output schema (its embedding columns and carried columns);
    torch_threads: intra-op threads of each call (Ray Data may run several calls at once).
    """

    def __init__(self, members: list[Member], heads: list[np.ndarray], labeling: Labeling, schema: pa.Schema,
                 device: str, torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.members, self.labeling, self.schema = members, labeling, schema
        self.models = [m.load(device) for m in members]
        self.device = self.models[0].device
        self.heads = [torch.tensor(np.asarray(h), dtype=torch.float32, device=self.device) for h in heads]
        configs = decode_configs([m.preprocess for m in members])
        self.pixels = [pixels_column(configs.index(m.preprocess)) if m.preprocess else "pixels" for m in members]
        # What input.decode: gpu cuts to: the job's one preprocess config (the model's own when unset).
        self.first_config = json.dumps(configs[0] or self.models[0].preprocess_cfg)
        self.carried = schema.names[schema.get_field_index("error") + 1:]
        self.chunk: int | None = None  # at most this many images per forward pass, once a batch ran out of memory
        self.lane = _Lane()

    def describe(self, where: str = platform.node()) -> str:
        """The encoder's start-up line: where it runs, on what device, with which models."""
        name = torch.cuda.get_device_name() if self.device == "cuda" else platform.processor() or "cpu"
        models = ", ".join(f"{m.name} ({loaded.precision})" for m, loaded in zip(self.members, self.models))
        return (f"clipbatch encoder on {where} (pid {os.getpid()}): device {self.device} ({name}), {models}, "
                f"torch threads {torch.get_num_threads()}")

    def _embed(self, model, pixels: np.ndarray) -> torch.Tensor:
        """Embeddings of the pixels, in chunks no larger than a forward pass that fits the GPU's memory: a
        batch that runs out of memory is halved (and the actor says so once) instead of failing the job."""
        chunk = self.chunk or len(pixels)
        try:
            return torch.cat([model.embed_images(pixels[i:i + chunk]) for i in range(0, len(pixels), chunk)])
        except torch.cuda.OutOfMemoryError:
            if chunk == 1:
                raise
            if self.chunk is None:
                print(f"clipbatch encoder (pid {os.getpid()}): CUDA out of memory on {chunk} images at once; this "
                      "actor halves its forward passes until they fit (lower compute.batch_size to avoid it)",
                      flush=True)
            self.chunk = max(1, chunk // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self._embed(model, pixels)

    def _on_device(self, batch: dict[str, np.ndarray], errors: np.ndarray):
        """input.decode: gpu: the batch's JPEGs decoded here, with the decode stage's raw pixels."""
        size = pixel_size(self.first_config)
        return device_pixels(batch["jpeg"], batch["orientation"], batch["pixels_raw"], self.first_config, size,
                             self.device, errors)

    def _stream(self):
        """This thread's CUDA stream as the current one (on CPU, nothing)."""
        if self.device != "cuda":
            return nullcontext()
        if self.lane.stream is None:
            self.lane.stream = torch.cuda.Stream()
        return torch.cuda.stream(self.lane.stream)

    def _valid_pixels(self, pixels, valid: np.ndarray):
        """The valid rows' pixels for the model. Pixels already on the device (input.decode: gpu) and a
        batch sent to CUDA have their rows chosen there; the batch goes through this thread's pinned
        buffer without blocking, reused once the results are copied back (which waits for the stream)."""
        if not isinstance(pixels, torch.Tensor):
            if self.device != "cuda":
                return np.ascontiguousarray(pixels[valid])
            pixels = np.ascontiguousarray(pixels)
            if self.lane.pinned is None or self.lane.pinned.numel() < pixels.size:
                self.lane.pinned = torch.empty(pixels.size, dtype=torch.uint8).pin_memory()
            staged = self.lane.pinned[:pixels.size].view(pixels.shape)
            staged.copy_(torch.from_numpy(pixels))
            pixels = staged.to(self.device, non_blocking=True)
        return pixels if valid.all() else pixels[torch.from_numpy(valid).to(self.device)]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        with self._stream():
            return self._encode(batch)

    def _encode(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = np.array([str(e) for e in batch["error"]], dtype=object)
        on_device = self._on_device(batch, errors) if "jpeg" in batch else None
        valid = errors == NO_ERROR
        n = len(errors)
        embeddings = {m.column: np.zeros((n, h.shape[1]), dtype=np.float32) for m, h in zip(self.members, self.heads)}
        probs = np.zeros((0, len(self.labeling.classes)), np.float32)
        if valid.any():
            member_logits = []
            for member, model, head, pixels in zip(self.members, self.models, self.heads, self.pixels):
                chosen = self._valid_pixels(on_device if on_device is not None else batch[pixels], valid)
                emb = self._embed(model, chosen)
                member_logits.append(logits((emb @ head.T).cpu().numpy(), member))
                embeddings[member.column][valid] = emb.cpu().numpy()
            probs = mix(member_logits, self.members, self.labeling.temperature)
        no_size = ~valid | (batch["width"] == FAILED_SIZE)
        columns = {
            "id": pa.array(batch["id"].astype(str), pa.string()),
            "source": pa.array(batch["source"].astype(str), pa.string()),
            "width": pa.array(batch["width"], pa.int32(), mask=no_size),
            "height": pa.array(batch["height"], pa.int32(), mask=no_size),
            **label_columns(probs, valid, self.labeling),
        }
        for name, values in embeddings.items():
            if name in self.schema.names:
                value_type = self.schema.field(name).type.value_type
                columns[name] = fixed_size_lists(values.astype(value_type.to_pandas_dtype()), valid, value_type)
        columns["error"] = pa.array(errors, pa.string(), mask=valid)
        for name in self.carried:
            # A column that is missing everywhere comes back from Ray's Arrow/numpy round trip as NaNs.
            columns[name] = pa.array([None if v is None or v != v else str(v) for v in batch[name]], pa.string())
        return pa.Table.from_pydict(columns, schema=self.schema)
