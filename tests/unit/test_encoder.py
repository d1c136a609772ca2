"""The encoder alone (no Ray): precisions on CPU, concurrent calls, and error rows passed through."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from clipbatch.model.load import pick_device
from clipbatch.model.members import Member
from clipbatch.model.scoring import Labeling
from clipbatch.model.text_head import build_heads
from clipbatch.output.schema import output_schema
from clipbatch.pipeline.decode import read_and_decode
from clipbatch.pipeline.encoder import ClipEncoder

CLASSES = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def heads(tiny_model):
    """The tiny model as a job's member, with its text head for three classes."""
    members, heads = build_heads([Member(tiny_model, precision="fp32")], [[f"a photo of a {c}."] for c in CLASSES])
    return members, heads


@pytest.fixture(scope="module")
def batch(heads, images):
    sources = np.array([str(p) for p in sorted(images.rglob("*.png"))], dtype=object)
    members, _ = heads
    preprocess = members[0].load("cpu").preprocess_cfg
    return read_and_decode({"id": sources, "source": sources}, json.dumps(preprocess), {})


def encoder(heads, precision="fp32", top_k=2, **kwargs) -> ClipEncoder:
    members, head_arrays = heads
    members = [dataclasses.replace(m, precision=precision) for m in members]
    schema = output_schema(len(CLASSES), {"embedding": head_arrays[0].shape[1]}, "float32")
    return ClipEncoder(members, head_arrays, Labeling(CLASSES, top_k), schema, "cpu", **kwargs)


def embeddings(table) -> np.ndarray:
    return np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)


@pytest.mark.parametrize("precision, min_cosine", [("fp32", 0.99999), ("bf16", 0.99), ("fp16", 0.995)])
def test_encoder_precisions_on_cpu(heads, batch, precision, min_cosine):
    reference, table = encoder(heads)(batch), encoder(heads, precision)(batch)
    a, b = embeddings(reference), embeddings(table)
    assert ((a * b).sum(1) >= min_cosine).all()
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-3)


def test_concurrent_calls_share_one_encoder(heads, batch):
    """A CPU actor runs several batches at once from several threads: each comes out as it does alone
    (the test checks that its calls did overlap, so that this compares concurrent calls)."""
    inside, overlapped = [0], [False]
    lock = threading.Lock()

    class Recording(ClipEncoder):
        def __call__(self, batch):
            with lock:
                inside[0] += 1
                overlapped[0] |= inside[0] > 1
            time.sleep(0.05)  # long enough for the other call to come in
            try:
                return super().__call__(batch)
            finally:
                with lock:
                    inside[0] -= 1

    members, head_arrays = heads
    schema = output_schema(len(CLASSES), {"embedding": head_arrays[0].shape[1]}, "float32")
    shared = Recording(members, head_arrays, Labeling(CLASSES, 2), schema, "cpu", torch_threads=1)
    batches = [{k: v[i::4] for k, v in batch.items()} for i in range(4)]
    alone = [shared(b) for b in batches]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(shared, batches * 3))
    assert overlapped[0]
    for a, b in zip(alone * 3, together):
        assert a["id"].to_pylist() == b["id"].to_pylist() and a["label"].to_pylist() == b["label"].to_pylist()
        assert np.allclose(embeddings(a), embeddings(b), atol=1e-6)


def test_error_rows_pass_through_with_nulls(heads, batch):
    broken = {k: v.copy() for k, v in batch.items()}
    broken["error"][0] = "ValueError: broken"
    table = encoder(heads)(broken).to_pylist()
    assert table[0]["error"] == "ValueError: broken" and table[0]["label"] is None
    assert table[0]["embedding"] is None and table[0]["scores"] is None and table[0]["top_labels"] is None
    assert all(r["error"] is None and r["label"] in CLASSES and len(r["top_labels"]) == 2 for r in table[1:])


def test_gpu_actor_without_cuda_fails_loudly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="finds no CUDA device"):
        pick_device("cuda")


def test_a_batch_out_of_gpu_memory_is_halved_and_the_job_goes_on(heads, batch, capsys):
    """The forward raises CUDA's out-of-memory error above 3 images at once: the actor halves its
    forward passes until they fit, says so once, and its rows equal those of a batch that fit."""
    reference = encoder(heads)(batch)
    shrinking = encoder(heads)
    model = shrinking.models[0].model
    fits = model.encode_image

    def encode_image(x, *args, **kwargs):
        if x.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fits(x, *args, **kwargs)

    model.encode_image = encode_image
    first, second = shrinking(batch), shrinking(batch)
    assert shrinking.chunk == len(batch["id"]) // 2 == 3  # 7 images at once did not fit, 3 do
    printed = capsys.readouterr().out
    assert printed.count("CUDA out of memory") == 1 and "halves its forward passes" in printed
    for table in (first, second):
        assert table["label"].to_pylist() == reference["label"].to_pylist()
        assert np.allclose(embeddings(table), embeddings(reference), atol=1e-5)
