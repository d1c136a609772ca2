"""Devices, precisions and resource plans: what the job asks Ray for, and the encoder alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipbatch.config import SpecError, load_spec
from clipbatch.decode import read_and_decode
from clipbatch.encoder import ClipEncoder, Member
from clipbatch.labels import build_text_head
from clipbatch.models import load_model, pick_device
from clipbatch.pipeline import ComputePlan
from conftest import spec_dict


def plan(tmp_path, cluster_gpus, cpus_per_node=2, can_grow=False, **compute):
    spec = load_spec(spec_dict(tmp_path, "ViT-B-32", tmp_path / "out", compute=compute))
    return ComputePlan.from_spec(spec, cluster_gpus, cpus_per_node, can_grow)


def encoder_inputs(model_name, images):
    """The model loaded on CPU, three classes, their text head as ClipEncoder takes it, and the PNGs."""
    loaded = load_model(model_name, None, device="cpu", precision="fp32")
    classes = ["cat", "dog", "car"]
    head = build_text_head(loaded, [[f"a photo of a {c}."] for c in classes])
    sources = np.array([str(p) for p in sorted(images.rglob("*.png"))], dtype=object)
    return loaded, classes, [{"text_head": head, "logit_scale": loaded.logit_scale, "logit_bias": None}], sources


def test_defaults_adapt_to_cluster(tmp_path):
    cpu = plan(tmp_path, 0)
    assert (cpu.device, cpu.gpus_per_actor, cpu.min_actors, cpu.max_actors, cpu.batch_size) == ("cpu", 0, 1, 1, 32)
    gpu = plan(tmp_path, 4)
    assert (gpu.device, gpu.gpus_per_actor, gpu.min_actors, gpu.max_actors, gpu.batch_size) == ("cuda", 1, 4, 4, 256)
    # On CPU: one actor a node, one single-threaded lane per core, decoding its own batches, one CPU
    # left for writes.
    assert (cpu.lanes, cpu.torch_threads, cpu.cpus_per_actor, cpu.decode_in_actors) == (2, 1, 1.0, True)
    assert (gpu.lanes, gpu.torch_threads, gpu.cpus_per_actor, gpu.decode_in_actors) == (1, 1, 1.0, False)
    two = plan(tmp_path, 0, actors=2)  # actors asked for: the node's cores shared between them
    assert (two.max_actors, two.lanes, two.torch_threads, two.cpus_per_actor) == (2, 1, 1, 0.5)
    big = plan(tmp_path, 0, cpus_per_node=16)  # at most 8 lanes, each with the cores' share of threads
    assert (big.max_actors, big.lanes, big.torch_threads, big.cpus_per_actor) == (1, 8, 2, 15)
    assert (lambda p: (p.lanes, p.torch_threads))(plan(tmp_path, 0, cpus_per_node=16, actors=4)) == (4, 1)
    three_nodes = ComputePlan.from_spec(load_spec(spec_dict(tmp_path, "ViT-B-32", tmp_path / "out")), 0, 4,
                                        nodes=3)
    assert (three_nodes.max_actors, three_nodes.lanes, three_nodes.cpus_per_actor) == (3, 4, 3)
    # An explicit reservation: as many actors as leave a CPU of the node free.
    assert plan(tmp_path, 0, cpus_per_actor=1).max_actors == 1
    assert plan(tmp_path, 0, cpus_per_node=8, cpus_per_actor=2).max_actors == 3
    spec = load_spec(spec_dict(tmp_path, "ViT-B-32", tmp_path / "out", compute={"cpus_per_actor": 1}))
    # ... and as many as the node's memory holds (each: its model's weights and the runtime).
    assert ComputePlan.from_spec(spec, 0, 16, memory_per_node=10 * 2**30, actor_bytes=3 * 2**30).max_actors == 3
    assert ComputePlan.from_spec(spec, 0, 16, memory_per_node=2**30, actor_bytes=3 * 2**30).max_actors == 1
    # No more actors, nor lanes, than there are batches to do: a 20-image job gets one actor with the
    # node's cores as the threads of one lane.
    spec = load_spec(spec_dict(tmp_path, "ViT-B-32", tmp_path / "out"))
    small = ComputePlan.from_spec(spec, 0, 2, rows_to_do=20)
    assert (small.max_actors, small.lanes, small.torch_threads, small.cpus_per_actor) == (1, 1, 2, 1.0)
    assert ComputePlan.from_spec(spec, 0, 2, rows_to_do=1, shards=True).max_actors == 1  # one shard, one actor
    four_nodes = ComputePlan.from_spec(spec, 0, 2, nodes=4, rows_to_do=64)  # two batches: two actors
    assert (four_nodes.max_actors, four_nodes.lanes) == (2, 2)
    logical = plan(tmp_path, 1, device="cpu", gpus_per_actor=1)  # a logical GPU: a GPU-style actor, on CPU
    assert (logical.cpus_per_actor, logical.decode_in_actors, logical.lanes, logical.torch_threads) == \
        (1.0, False, 1, 2)


def test_lanes_share_one_encoder(tiny_model, images):
    """A CPU actor's lanes call one encoder from several threads at once: each batch comes out as it
    does alone (the test checks that its calls did overlap, so that this compares concurrent calls)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    loaded, classes, heads, sources = encoder_inputs(tiny_model, images)
    batches = [read_and_decode({"id": s, "source": s}, json.dumps(loaded.preprocess_cfg), {})
               for s in np.array_split(sources, 4)]
    inside, overlapped = [0], [False]
    lock = threading.Lock()

    class Recording(ClipEncoder):
        def __call__(self, batch):
            with lock:
                inside[0] += 1
                overlapped[0] |= inside[0] > 1
            time.sleep(0.05)  # long enough for the other lane to come in
            try:
                return super().__call__(batch)
            finally:
                with lock:
                    inside[0] -= 1

    encoder = Recording([Member(tiny_model, None, "fp32")], "cpu", heads, classes, 2, "float32", 8, torch_threads=1,
                        lanes=2)
    alone = [encoder(b) for b in batches]
    with ThreadPoolExecutor(2) as lanes:
        together = list(lanes.map(encoder, batches * 3))
    assert overlapped[0]
    for a, b in zip(alone * 3, together):
        assert a["id"].to_pylist() == b["id"].to_pylist() and a["label"].to_pylist() == b["label"].to_pylist()
        assert np.allclose(np.stack(a["embedding"].to_numpy(zero_copy_only=False)),
                           np.stack(b["embedding"].to_numpy(zero_copy_only=False)), atol=1e-6)


def test_fractional_gpus_and_autoscaling_pool(tmp_path):
    p = plan(tmp_path, 2, gpus_per_actor=0.5)
    assert p.max_actors == 4 and p.device == "cuda"
    p = plan(tmp_path, 2, actors=[1, 3], batch_size=64)
    assert (p.min_actors, p.max_actors, p.batch_size) == (1, 3, 64)
    # Logical GPUs on a CPU machine: GPU scheduling, CPU compute.
    p = plan(tmp_path, 1, device="cpu", gpus_per_actor=1)
    assert (p.device, p.gpus_per_actor) == ("cpu", 1)


def test_impossible_requests_fail_before_work(tmp_path):
    with pytest.raises(SpecError, match="reports 0 GPUs"):
        plan(tmp_path, 0, gpus_per_actor=1)
    with pytest.raises(SpecError, match="device is cuda"):
        plan(tmp_path, 0, device="cuda")


def test_a_cluster_scaled_to_zero_gpus_waits_for_its_autoscaler(tmp_path):
    p = plan(tmp_path, 0, can_grow=True, gpus_per_actor=1, actors=[1, 8])
    assert (p.device, p.gpus_per_actor, p.min_actors, p.max_actors, p.batch_size) == ("cuda", 1, 1, 8, 256)
    assert plan(tmp_path, 0, can_grow=True).device == "cpu"  # auto still means the GPUs Ray reports


def test_gpu_actor_without_cuda_fails_loudly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="finds no CUDA device"):
        pick_device("cuda")


@pytest.mark.parametrize("precision, min_cosine", [("fp32", 0.99999), ("bf16", 0.99), ("fp16", 0.995)])
def test_encoder_precisions_on_cpu(tiny_model, images, precision, min_cosine):
    loaded, classes, heads, sources = encoder_inputs(tiny_model, images)
    batch = read_and_decode({"id": sources, "source": sources}, json.dumps(loaded.preprocess_cfg), {})

    def run(p):
        return ClipEncoder([Member(tiny_model, None, p)], "cpu", heads, classes, 2, "float32", 8)(batch)

    reference, table = run("fp32"), run(precision)
    a = np.stack(reference["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    b = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    assert ((a * b).sum(1) >= min_cosine).all()
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-3)
