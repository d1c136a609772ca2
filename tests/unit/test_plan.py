"""The compute plan: what a job asks Ray for, from the spec's compute section and the cluster alone."""

from __future__ import annotations

import pytest

from clipbatch.errors import UserError
from clipbatch.pipeline.plan import plan_for
from clipbatch.pipeline.session import Cluster
from clipbatch.spec import ComputeSpec

GiB = 2**30


def plan(gpus=0.0, cpus_per_node=2, nodes=1, address="local", memory_per_node=64 * GiB, actor_bytes=GiB,
         gpu_batch=256, **compute):
    cluster = Cluster(address, nodes, cpus_per_node * nodes, gpus, memory_per_node * nodes)
    return plan_for(ComputeSpec(**compute), cluster, actor_bytes, gpu_batch)


def test_defaults_adapt_to_the_cluster():
    cpu = plan(0)
    assert (cpu.device, cpu.gpus_per_actor, cpu.min_actors, cpu.max_actors, cpu.batch_size) == ("cpu", 0, 1, 1, 32)
    gpu = plan(4)
    assert (gpu.device, gpu.gpus_per_actor, gpu.min_actors, gpu.max_actors, gpu.batch_size) == ("cuda", 1, 4, 4, 256)
    # On CPU: one actor a node decoding its own batches, one batch per core at once at one torch
    # thread each, one CPU left for the write tasks.
    assert (cpu.concurrent_batches, cpu.torch_threads, cpu.cpus_per_actor, cpu.decode_in_actors) == (2, 1, 1.0, True)
    assert (gpu.concurrent_batches, gpu.torch_threads, gpu.cpus_per_actor, gpu.decode_in_actors) == \
        (2, 1, 0.25, False)  # a 2-core node: the GPU actors' feeding takes a share of it, the rest decodes


def test_a_gpu_nodes_cores_decode_but_one_that_feeds_and_one_that_writes():
    node = plan(1, cpus_per_node=16)
    assert (node.cpus_per_actor, node.decode_cpus, node.write_cpus, node.write_tasks) == (1.0, 1.0, 0.5, 2)
    assert node.rows_per_block == node.batch_size  # a decode task makes one GPU batch
    eight = plan(16, cpus_per_node=96, nodes=2)  # two nodes of 8 GPUs: 8 feeders and 1 CPU of writes a node
    assert (eight.max_actors, eight.cpus_per_actor, eight.decode_cpus, eight.write_tasks) == (16, 1.0, 1.0, 4)
    small = plan(1, cpus_per_node=2)  # 2 cores: 0.25 feeds, 0.25 writes, 1.5 decode in tasks of half a CPU
    assert (small.cpus_per_actor, small.decode_cpus, small.write_cpus) == (0.25, 0.5, 0.125)
    assert plan(1, gpu_batch=1024).batch_size == 1024  # the model's GPU batch, unless the spec sets one
    assert plan(1, gpu_batch=1024, batch_size=128).batch_size == 128
    cpu = plan(0, cpus_per_node=16)  # CPU layout: decode fuses into the actors, with small blocks
    assert (cpu.decode_cpus, cpu.write_cpus, cpu.write_tasks, cpu.rows_per_block) == (15, 0.5, 2, 64)


def test_cpu_actors_share_the_nodes_cores():
    two = plan(0, actors=2)
    assert (two.max_actors, two.concurrent_batches, two.torch_threads, two.cpus_per_actor) == (2, 1, 1, 0.5)
    big = plan(0, cpus_per_node=16)  # at most 8 batches at once, each with the cores' share of threads
    assert (big.max_actors, big.concurrent_batches, big.torch_threads, big.cpus_per_actor) == (1, 8, 2, 15)
    assert (lambda p: (p.concurrent_batches, p.torch_threads))(plan(0, cpus_per_node=16, actors=4)) == (4, 1)
    three_nodes = plan(0, cpus_per_node=4, nodes=3)
    assert (three_nodes.max_actors, three_nodes.concurrent_batches, three_nodes.cpus_per_actor) == (3, 4, 3)


def test_explicit_cpus_per_actor_is_bounded_by_cpus_and_memory():
    assert plan(0, cpus_per_actor=1).max_actors == 1  # as many actors as leave a CPU of the node free
    assert plan(0, cpus_per_node=8, cpus_per_actor=2).max_actors == 3
    assert plan(0, cpus_per_node=16, cpus_per_actor=1, memory_per_node=10 * GiB, actor_bytes=3 * GiB).max_actors == 3
    assert plan(0, cpus_per_node=16, cpus_per_actor=1, memory_per_node=GiB, actor_bytes=3 * GiB).max_actors == 1


def test_fractional_gpus_and_autoscaling_pool():
    assert (lambda p: (p.max_actors, p.device))(plan(2, gpus_per_actor=0.5)) == (4, "cuda")
    p = plan(2, actors=[1, 3], batch_size=64)
    assert (p.min_actors, p.max_actors, p.batch_size) == (1, 3, 64)


def test_logical_gpus_schedule_like_gpus_and_compute_on_cpu():
    p = plan(1, device="cpu", gpus_per_actor=1)
    assert (p.device, p.gpus_per_actor, p.cpus_per_actor, p.decode_in_actors) == ("cpu", 1, 0.25, False)
    assert (p.concurrent_batches, p.torch_threads) == (1, 2)


def test_impossible_requests_fail_before_work():
    with pytest.raises(UserError, match="reports 0 GPUs"):
        plan(0, gpus_per_actor=1)
    with pytest.raises(UserError, match="device is cuda"):
        plan(0, device="cuda")


def test_a_cluster_scaled_to_zero_gpus_waits_for_its_autoscaler():
    p = plan(0, address="ray://head:10001", gpus_per_actor=1, actors=[1, 8])
    assert (p.device, p.gpus_per_actor, p.min_actors, p.max_actors, p.batch_size) == ("cuda", 1, 1, 8, 256)
    assert plan(0, address="ray://head:10001").device == "cpu"  # auto still means the GPUs Ray reports


def test_the_plan_describes_itself():
    assert plan(0).describe() == "device cpu, 1 encoder actor(s), 0 GPU and 1 CPU each, batch 32, 2 batches at once"
    assert plan(2, cpus_per_node=16, actors=[1, 3]).describe() == \
        "device cuda, 1-3 encoder actor(s), 1 GPU and 1 CPU each, batch 256, 2 batches at once, decode tasks of 1 CPU"


def test_the_gpu_batch_follows_the_models_activations():
    """Hundreds to a thousand images for ViT-B-32, fewer as tokens and width grow; read from the
    model's config on the meta device, without weights."""
    from clipbatch.model.load import gpu_batch_size
    assert [gpu_batch_size(n) for n in ("ViT-B-32", "ViT-L-14", "ViT-L-14-336", "ViT-bigG-14")] == [1024, 512, 128, 256]
    assert 64 <= gpu_batch_size("RN50") <= 1024
