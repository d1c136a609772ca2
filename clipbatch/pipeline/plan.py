"""The compute plan: what a job asks Ray for, a pure function of the spec's compute section and the cluster.

GPU clusters get one encoder actor per GPU (or per ``gpus_per_actor``) fed by
decode tasks sized to the node: on a 16-core node with one GPU, one CPU feeds the
GPU, one writes and 14 decode, each task a whole GPU batch of images. CPU clusters
get one encoder actor per node that decodes its own batches (Ray Data fuses the
stages) and runs one batch per core at once, each at one torch thread, leaving one
CPU of each node to the Parquet write tasks.

Ray Data hands an operator the CPUs the others leave, so capping the write tasks
(and the fixed actor pool) is what gives the decode tasks the rest of the node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clipbatch.errors import UserError
from clipbatch.pipeline.session import Cluster
from clipbatch.spec import ComputeSpec

WRITE_TASKS_PER_NODE = 2  # Parquet writes are mostly I/O: two at once keep up with any GPU
# Below this many CPUs a node gives a GPU actor (it only feeds the GPU) and the writes an eighth of
# itself each, and decodes in tasks of half a CPU, as the feeder and the writes use less than they hold.
SMALL_NODE_CPUS = 8
CPU_ROWS_PER_BLOCK = 64  # CPU layout: small blocks, so that every core gets work
MIN_DECODE_TASK_ROWS = 256  # GPU layout: a decode task long enough that its start and hand-over are small
CUDA_CALLS_IN_FLIGHT = 2  # a GPU actor's batches at once: one's copy and outputs overlap the other's forward
MAX_CONCURRENT_BATCHES = 8  # per CPU actor: beyond this, more threads only contend for the GIL
MAX_CPU_ACTORS_PER_NODE = 8  # with an explicit compute.cpus_per_actor
# Besides its weights a CPU actor holds torch, a batch's activations and Arrow buffers.
ACTOR_OVERHEAD_BYTES = 2**30


@dataclass(frozen=True)
class ComputePlan:
    device: str
    gpus_per_actor: float
    cpus_per_actor: float
    min_actors: int
    max_actors: int
    batch_size: int
    torch_threads: int        # intra-op threads of each batch an actor runs
    concurrent_batches: int   # batches an actor runs at once, each in a thread of its own
    decode_cpus: float        # each decode task's CPUs (the actors' own in the CPU layout, where they fuse)
    write_cpus: float         # each Parquet write task's CPUs
    write_tasks: int          # write tasks at once, over the cluster
    rows_per_block: int       # input rows per Ray block: a GPU batch, or a few rows for each CPU

    @property
    def decode_in_actors(self) -> bool:
        """CPU actors decode their own batches; GPU actors are fed by decode tasks on the node's CPUs."""
        return self.gpus_per_actor == 0

    def describe(self) -> str:
        actors = f"{self.min_actors}" + ("" if self.min_actors == self.max_actors else f"-{self.max_actors}")
        lanes = f", {self.concurrent_batches} batches at once" if self.concurrent_batches > 1 else ""
        decode = "" if self.decode_in_actors else f", decode tasks of {self.decode_cpus:.3g} CPU"
        return (f"device {self.device}, {actors} encoder actor(s), {self.gpus_per_actor:g} GPU and "
                f"{self.cpus_per_actor:.3g} CPU each, batch {self.batch_size}{lanes}{decode}")


def plan_for(compute: ComputeSpec, cluster: Cluster, actor_bytes: int = ACTOR_OVERHEAD_BYTES,
             gpu_batch: int = 256) -> ComputePlan:
    """actor_bytes: one CPU actor's memory estimate, which bounds how many actors an explicit
    cpus_per_actor puts on a node; gpu_batch: the batch the job's models take on a GPU (load.gpu_batch_size)."""
    gpus = _gpus_per_actor(compute, cluster)
    device = ("cuda" if gpus > 0 else "cpu") if compute.device == "auto" else compute.device
    batch = compute.batch_size if compute.batch_size != "auto" else (gpu_batch if device == "cuda" else 32)
    node_cpus = cluster.cpus / cluster.nodes
    spare = max(0.0, node_cpus - 1)  # one CPU of each node for the write tasks
    low, high = _actors(compute, cluster, gpus, spare, actor_bytes)
    per_node = math.ceil(high / cluster.nodes)
    if compute.cpus_per_actor != "auto":
        cpus = float(compute.cpus_per_actor)
    elif gpus > 0:
        cpus = min(1.0, node_cpus / SMALL_NODE_CPUS)
    else:
        cpus = spare / per_node if spare > 0 else 1.0
    threads, lanes = max(1, math.ceil(cpus)), 1
    if device == "cpu":
        # Ray pins an actor to as many threads as CPUs it reserved; a CPU actor's threads are the
        # node's cores shared by its actors, run as concurrent batches of one torch thread each.
        threads = max(threads, math.floor(node_cpus / per_node))
        lanes = max(1, min(threads, MAX_CONCURRENT_BATCHES)) if gpus == 0 else 1
    elif device == "cuda":
        lanes = CUDA_CALLS_IN_FLIGHT
    if gpus == 0:  # decode fuses into the actors
        decode_cpus, rows_per_block = cpus, CPU_ROWS_PER_BLOCK
    else:
        decode_cpus, rows_per_block = (1.0 if node_cpus >= SMALL_NODE_CPUS else 0.5), max(batch, MIN_DECODE_TASK_ROWS)
    write_cpus = min(0.5, node_cpus / (2 * SMALL_NODE_CPUS))
    return ComputePlan(device, gpus, cpus, low, high, batch, max(1, threads // lanes), lanes, decode_cpus,
                       write_cpus, WRITE_TASKS_PER_NODE * cluster.nodes, rows_per_block)


def _gpus_per_actor(compute: ComputeSpec, cluster: Cluster) -> float:
    if compute.gpus_per_actor == "auto":
        gpus = 1.0 if cluster.gpus >= 1 and compute.device != "cpu" else 0.0
    else:
        gpus = float(compute.gpus_per_actor)
    if gpus > cluster.gpus and not cluster.can_grow:
        raise UserError(f"compute.gpus_per_actor is {gpus} but the Ray cluster reports {cluster.gpus:g} GPUs")
    if compute.device == "cuda" and gpus == 0:
        raise UserError("compute.device is cuda but no GPU is requested (the Ray cluster reports no GPUs)")
    return gpus


def _actors(compute: ComputeSpec, cluster: Cluster, gpus: float, spare: float, actor_bytes: int) -> tuple[int, int]:
    """(min, max) encoder actors: one per GPU, or per CPU node, or as many as an explicit
    cpus_per_actor leaves room (and memory) for."""
    if isinstance(compute.actors, int):
        return compute.actors, compute.actors
    if compute.actors != "auto":
        return tuple(compute.actors)
    if gpus > 0:
        n = max(1, math.floor(cluster.gpus / gpus))
        return n, n
    fit = 1 if compute.cpus_per_actor == "auto" else \
        int(min(math.floor(spare / compute.cpus_per_actor + 1e-9), cluster.memory / cluster.nodes // actor_bytes,
                MAX_CPU_ACTORS_PER_NODE))
    n = max(1, cluster.nodes * fit)
    return n, n
