"""The one place where the stages are wired together with Ray Data.

``build(spec)`` checks everything that can be checked before Ray starts and
returns a Job; ``Job.run()`` executes listing (or shard-reader tasks) -> decode
tasks -> encoder actor pool -> Parquet sink, then writes the manifest and _SUCCESS.
"""

from __future__ import annotations

import _thread
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from clipbatch import __version__
from clipbatch.config import JobSpec, SpecError, load_spec
from clipbatch.decode import pixels_column
from clipbatch.encoder import ClipEncoder, Member
from clipbatch.labels import build_text_head
from clipbatch.models import check_hub_model, load_model, parameter_count, preprocess_config, resolve_model_name
from clipbatch.progress import JobCounter, ProgressReporter
from clipbatch.ray_session import init_ray, ray_cluster_info, ray_is_this_machine, started_here
from clipbatch.schema import output_schema, read_metadata
from clipbatch.outputs import MANIFEST, SUCCESS, OutputDir, head_file
from clipbatch.sinks import ParquetPartsDatasink
from clipbatch.shards import carried_name
from clipbatch.sources import input_format, list_images
from clipbatch.templates import ClassPrompts, resolve_prompts

ROWS_PER_BLOCK = 64  # listing rows per Ray block: small, so that every CPU gets decode work
DECODE_BATCH = 32
DECODE_CPUS = 0.5  # decode tasks beside GPU actors
# A CPU actor runs one lane per core it uses: a thread that decodes and encodes a batch of its own
# at one torch thread. Lanes do not wait for each other as the threads of one forward pass do (10.6-11.0
# against 8.5-9.0 img/s for ViT-B-32 on 2 cores, see README), and unlike one actor per core they share
# one process and one copy of the model: one start-up (imports, model load) instead of one per core.
MAX_LANES = 8
MAX_CPU_ACTORS_PER_NODE = 8  # with an explicit compute.cpus_per_actor
# Besides its weights a CPU actor holds torch, a batch's activations and Arrow buffers: 0.7 GiB was
# measured beside ViT-B-32's 0.6 GB of fp32 weights. An explicit cpus_per_actor gets no more actors a node
# than its memory holds.
ACTOR_OVERHEAD_BYTES = 2**30
# Fault tolerance is Ray Data's own: its map tasks retry without limit (max_retries=-1) and its
# pool actors restart and retry their batches without limit (max_restarts=-1,
# max_task_retries=-1), so a lost worker or node only redoes batches. Retries never duplicate
# rows because a part's name is the hash of its ids: a repeated write replaces the same file.
# (tests/test_multinode.py kills a node that holds an encoder actor part-way through a job.)


@dataclass
class ComputePlan:
    """What the job will ask Ray for, from the spec's compute section and the cluster's resources."""

    device: str
    gpus_per_actor: float
    cpus_per_actor: float
    min_actors: int
    max_actors: int
    batch_size: int
    torch_threads: int  # intra-op threads of each lane
    decode_in_actors: bool  # CPU actors decode their own batches (Ray Data fuses the stages)
    lanes: int = 1  # batches an actor works on at once, one thread each (CPU actors: one per core)

    @classmethod
    def from_spec(cls, spec: JobSpec, cluster_gpus: float, cpus_per_node: float = 1,
                  can_grow: bool = False, nodes: int = 1, memory_per_node: float = math.inf,
                  actor_bytes: int = ACTOR_OVERHEAD_BYTES, rows_to_do: int | None = None,
                  shards: bool = False) -> "ComputePlan":
        """can_grow: the job joined a running cluster, whose autoscaler may add the GPU nodes that an
        explicit gpus_per_actor asks for (a cluster scaled to zero GPU nodes reports none yet).
        memory_per_node and actor_bytes (one CPU actor's estimate) bound how many CPU actors auto puts
        on a node, and rows_to_do (listing rows: images, or shards when shards is set) how many are
        worth starting at all: no more than the listing's blocks."""
        c = spec.compute
        if c.gpus_per_actor == "auto":
            gpus = 1.0 if cluster_gpus >= 1 and c.device != "cpu" else 0.0
        else:
            gpus = float(c.gpus_per_actor)
        if gpus > cluster_gpus and not can_grow:
            raise SpecError(f"compute.gpus_per_actor is {gpus} but the Ray cluster reports {cluster_gpus:g} GPUs")
        if c.device == "cuda" and gpus == 0:
            raise SpecError("compute.device is cuda but no GPU is requested (the Ray cluster reports no GPUs)")
        device = ("cuda" if gpus > 0 else "cpu") if c.device == "auto" else c.device
        nodes = max(1, nodes)
        batch = c.batch_size if c.batch_size != "auto" else (256 if device == "cuda" else 32)
        decode_in_actors = gpus == 0
        blocks = None if rows_to_do is None else \
            rows_to_do if shards else math.ceil(rows_to_do / listing_rows_per_block(decode_in_actors, batch))
        # CPU actors leave one CPU of each node to the Parquet write tasks (1 CPU each).
        spare = max(0.0, cpus_per_node - 1)
        if c.actors == "auto":
            if gpus > 0:
                low = high = max(1, math.floor(cluster_gpus / gpus))
            else:  # one actor a node, or as many as an explicit reservation leaves room (and memory) for
                fit = 1 if c.cpus_per_actor == "auto" else \
                    int(min(math.floor(spare / c.cpus_per_actor + 1e-9), memory_per_node // actor_bytes,
                            MAX_CPU_ACTORS_PER_NODE))
                low = high = max(1, min(nodes * fit, blocks or math.inf))
        elif isinstance(c.actors, int):
            low = high = c.actors
        else:
            low, high = c.actors
        per_node = math.ceil(high / nodes)
        if c.cpus_per_actor != "auto":
            cpus = float(c.cpus_per_actor)
        else:
            cpus = spare / per_node if gpus == 0 and spare > 0 else 1.0
        # Ray pins an actor to as many threads as CPUs it reserved, which would halve a CPU encoder
        # that reserved a fraction; its threads are the node's cores shared by its actors, run as
        # lanes of one torch thread (no more lanes than batches to do: a one-batch job gets the threads).
        if device == "cpu":
            threads = max(math.ceil(cpus), math.floor(cpus_per_node / per_node))
            lanes = max(1, min(threads, MAX_LANES, blocks or math.inf)) if decode_in_actors else 1
            threads = max(1, threads // lanes)
        else:
            threads, lanes = math.ceil(cpus), 1
        return cls(device, gpus, cpus, low, high, batch, threads, decode_in_actors, lanes)


def listing_rows_per_block(decode_in_actors: bool, batch_size: int) -> int:
    """Listing rows per Ray block. In CPU actors a block is one task of decode and encode: a batch
    each, so that the job's last tasks are short and no actor waits long for another to finish."""
    return min(ROWS_PER_BLOCK, batch_size) if decode_in_actors else ROWS_PER_BLOCK


@dataclass
class RunSummary:
    output: str
    rows: int
    errors: int
    new_rows: int
    seconds: float
    images_per_s: float
    device: str
    complete: bool
    skipped: bool = False
    notes: list[str] = field(default_factory=list)


def fingerprint(spec: JobSpec, prompts: ClassPrompts) -> dict:
    """What decides the results: a resume must not mix outputs that differ in any of it."""
    labels, members = spec.labels, spec.members

    def each(attr: str):
        values = [getattr(m, attr) for m in members]
        return values if spec.ensemble else values[0]

    return {"model": each("name"), "pretrained": each("pretrained"), "precision": each("precision"),
            **({"weights": each("weight"), "keys": each("column_key")} if spec.ensemble else {}),
            "classes": prompts.names, "templates": prompts.templates, "prompts": prompts.digest(),
            "temperature": labels.temperature, "min_score": labels.min_score, "unknown": labels.unknown,
            "embedding_dtype": spec.output.embedding_dtype if spec.output.embeddings else None}


def _prepared(heads: list[dict], metadata: dict, columns: list[str], embedding_dtype,
              carried) -> tuple[dict, pa.Schema]:
    """The text heads for the encoders and the output schema for the sink, with each model's
    precision, logit scale and bias in its metadata (top level for one model, per member in
    ``ensemble`` for several)."""
    runtime = [{"precision": h["precision"], "logit_scale": h["logit_scale"], "logit_bias": h["logit_bias"],
                "embedding_dim": int(h["text_head"].shape[1])} for h in heads]
    if "ensemble" in metadata:
        metadata = {**metadata, "ensemble": [{**m, **r} for m, r in zip(metadata["ensemble"], runtime)]}
    else:
        metadata = {**metadata, **runtime[0]}
    prepared = {"heads": heads, "metadata": metadata, "seconds": time.time()}
    dims = {column: h["text_head"].shape[1] for column, h in zip(columns, heads)}
    return prepared, output_schema(heads[0]["text_head"].shape[0], dims, embedding_dtype, metadata, carried)


def _prepare_text_heads(models: list[tuple], device, prompts, metadata, columns, embedding_dtype,
                        carried) -> tuple[dict, pa.Schema]:
    """Runs once per job, as a Ray task placed like an encoder actor, while the pipeline starts.
    models: (resolved name, pretrained, precision) per member, loaded one after the other."""
    heads = []
    for name, pretrained, precision in models:
        try:
            loaded = load_model(name, pretrained, device=device, precision=precision)
        except Exception as exc:  # files the checks found but cannot read (corrupt, truncated, another model's)
            raise SpecError(f"model {name}{f' ({pretrained})' if pretrained else ''} cannot be loaded: "
                            f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
        heads.append({"text_head": build_text_head(loaded, prompts), "logit_scale": loaded.logit_scale,
                      "logit_bias": loaded.logit_bias, "precision": loaded.precision})
        del loaded
    return _prepared(heads, metadata, columns, embedding_dtype, carried)


def _lower_priority() -> None:
    """The driver's text-head thread yields the cores (Linux niceness is per thread): it has until
    the encoders have loaded their models, and on a small machine the job waits for their start-up,
    which it slowed (their constructors began 14.4-14.6 s after launch at niceness 10, 16.0 s at 0)."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class _DriverTextHeads:
    """The text heads built in a driver thread while the dataset starts. The encoders get them
    through the job's counter; if building them fails (a checkpoint that cannot be loaded), the
    running dataset is interrupted at once, instead of the encoders failing one after another."""

    def __init__(self, pool: ThreadPoolExecutor, args: tuple):
        self.future = pool.submit(_prepare_text_heads, *args)
        self._dataset_running = threading.Event()

    def through(self, counter) -> tuple:
        """(prepared, schema) refs for the encoders and the sink, filled once the heads are built."""
        refs = counter.text_heads.options(num_returns=2).remote()
        self.future.add_done_callback(lambda done: self._hand_over(done, counter))
        return refs

    def _hand_over(self, done: Future, counter) -> None:
        if done.exception() is None:
            counter.hand_over.remote(*done.result())
            return
        counter.hand_over.remote(None, None, f"the text head failed in the driver: {done.exception()!r}")
        if self._dataset_running.is_set():
            _thread.interrupt_main()  # a KeyboardInterrupt in the dataset's run, which run() turns into this error

    def failure(self) -> BaseException | None:
        return self.future.exception() if self.future.done() else None

    @contextmanager
    def interrupting(self):
        """While the dataset runs in the main thread: a failure of the heads interrupts it."""
        self._dataset_running.set()
        try:
            if self.failure() is not None:  # it failed before the dataset started
                raise self.failure()
            yield
        finally:
            self._dataset_running.clear()


class _CountingEncoder(ClipEncoder):
    """The encoder, fed by the text-head task and reporting each batch to the job's progress
    counter (this wrapper keeps encoder.py free of Ray)."""

    def __init__(self, counter, prepared, **kwargs):
        import platform

        import ray

        self.counter = counter
        node = f"{platform.node()} (Ray node {ray.get_runtime_context().get_node_id()[:12]})"
        super().__init__(heads=prepared, node=node, **kwargs)

    def use_text_heads(self, prepared) -> None:
        import ray

        # Reached after this actor has loaded its models: the two loads run side by side.
        super().use_text_heads(ray.get(prepared)["heads"])

    def __call__(self, batch):
        table = super().__call__(batch)
        self.counter.add.remote(table.num_rows, table.num_rows - table["error"].null_count)
        return table


def _json_safe(value):
    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


class Job:
    """A validated job: inputs listed, output checked, ready to run."""

    def __init__(self, spec: JobSpec):
        started = time.time()
        self.spec = spec
        try:
            for member in spec.members:
                check_hub_model(member.name)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        self.preprocess_cfgs = [preprocess_config(m.name, m.pretrained) for m in spec.members]
        self.cpu_actor_bytes = ACTOR_OVERHEAD_BYTES + sum(
            parameter_count(m.name) * (2 if m.precision in ("fp16", "bf16") else 4) for m in spec.members)
        self.preprocess_cfg = self.preprocess_cfgs[0]
        # Each image is decoded once, and cut once per distinct input size/preprocessing.
        self.decode_cfgs = [c for i, c in enumerate(self.preprocess_cfgs) if c not in self.preprocess_cfgs[:i]]
        self.members = [Member(resolve_model_name(m.name), m.pretrained, m.precision, m.weight,
                               f"embedding_{m.column_key}" if spec.ensemble else "embedding",
                               pixels_column(self.decode_cfgs.index(cfg)), cfg)
                        for m, cfg in zip(spec.members, self.preprocess_cfgs)]
        self.prompts = resolve_prompts(spec.labels, spec.input.storage_options)
        self.classes, self.templates = self.prompts.names, self.prompts.templates
        self.format = input_format(spec.input)
        self.carried = [carried_name(k) for k in spec.input.keep]  # output columns of input.keep
        self.listing = list_images(spec.input)
        self.out = OutputDir(spec.output.path, spec.output.storage_options)
        self.fingerprint = fingerprint(spec, self.prompts)
        self.listing_seconds = time.time() - started
        self.ray_started_at: float | None = None  # set where Ray started beside this build (the CLI)

    def describe(self, sample: int = 5) -> str:
        s = self.spec
        n = self.listing.num_rows
        ids = self.listing.column("source").slice(0, sample).to_pylist()
        lines = [f"job        {s.name}",
                 f"images     {n:,} found in {s.input.path}" if self.format == "images" else
                 f"shards     {n:,} {self.format} shards found in {s.input.path}",
                 *[f"           {i}" for i in ids],
                 *(["           ..."] if n > sample else []),
                 f"classes    {len(self.classes)}: {', '.join(self.classes[:10])}"
                 f"{' ...' if len(self.classes) > 10 else ''}",
                 f"templates  {len(self.templates)} ({self.prompts.templates_name}): "
                 f"{self.templates[0]!r}{' ...' if len(self.templates) > 1 else ''}"
                 + (f"; {len(self.prompts.custom)} class(es) with synonyms or own prompts" if self.prompts.custom
                    else ""),
                 *[f"{'model' if i == 0 else '':<11}{m.name}{' pretrained=' + m.pretrained if m.pretrained else ''}, "
                   f"precision {m.precision}"
                   + (f", weight {e.weight / sum(x.weight for x in self.members):.3g} -> {e.embedding_column}"
                      if s.ensemble else "")
                   for i, (m, e) in enumerate(zip(s.members, self.members))],
                 f"device     {s.compute.device} (auto: GPU actors where Ray reports GPUs, else CPU)"
                 if s.compute.device == "auto" else f"device     {s.compute.device}",
                 f"output     {self.out.url} (mode {s.output.mode})"]
        return "\n".join(lines)

    def _check_output(self) -> pa.Table | None:
        """Apply output.mode; returns the inputs still to do, or None when the output is complete."""
        mode = self.spec.output.mode
        parts = self.out.parts()
        existing = bool(parts) or self.out.exists(MANIFEST) or self.out.exists(SUCCESS)
        if existing and mode == "error":
            raise SpecError(f"output.path {self.out.url} already holds output (output.mode is error)")
        if existing and mode == "overwrite":
            self.out.clear()
            parts = []
        if parts:
            import pyarrow.parquet as pq
            earlier = read_metadata(pq.read_schema(parts[0], filesystem=self.out.fs)).get("fingerprint")
            if earlier != self.fingerprint:
                changed = sorted(k for k in self.fingerprint if (earlier or {}).get(k) != self.fingerprint[k])
                raise SpecError(f"output.path {self.out.url} holds results made with a different "
                                f"{', '.join(changed)}; use another output.path or output.mode: overwrite")
        for leftover in self.out.leftovers():  # half-written files of a killed run: never parts
            self.out.fs.rm_file(leftover)
        if self.out.exists(SUCCESS):
            return None
        return self._with_done(self.listing, self.out.written_rows())

    def _with_done(self, listing: pa.Table, written: pa.Table) -> pa.Table:
        """Images: the listing minus what is written. Shards (whose rows are only known once read):
        the shards not known to be finished (a recorded row count that all its written rows
        reach), each with the ids of its rows already written, for the reader to skip."""
        from clipbatch.shards import read_shard_records

        if self.format == "images":
            done = written["id"].combine_chunks()
            return listing.filter(pc.invert(pc.is_in(listing["id"], value_set=done)))
        by_shard = written.group_by("source").aggregate([("id", "list")])
        done = dict(zip(by_shard["source"].to_pylist(), by_shard["id_list"].to_pylist()))
        records = read_shard_records(self.out) if done else {}
        sources = listing["source"].to_pylist()
        unfinished = [records.get(s) != len(done.get(s, [])) for s in sources]
        listing = listing.append_column("done", pa.array([done.get(s, []) for s in sources], pa.list_(pa.string())))
        return listing.filter(pa.array(unfinished, pa.bool_()))

    def run(self) -> RunSummary:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # A job whose Ray started beside its checks counts from there, so "s in all" and the
        # timings still include Ray's start.
        started = self.ray_started_at or time.time()
        self.out.check_writable()
        todo = self._check_output()
        if todo is None:
            manifest, rows, errors = self.out.announce_complete(self.listing.num_rows)
            return RunSummary(self.out.url, rows, errors, 0, time.time() - started, 0.0, manifest.get("device", "?"),
                              True, skipped=True)

        t0 = self.ray_started_at or time.time()
        embedding_dtype = self.spec.output.embedding_dtype if self.spec.output.embeddings else None
        metadata = {"clipbatch_version": __version__, **self._model_metadata(), "classes": self.classes,
                    "templates": self.templates, "templates_name": self.prompts.templates_name,
                    "custom_prompts": self.prompts.custom, "temperature": self.spec.labels.temperature,
                    "min_score": self.spec.labels.min_score, "unknown": self.spec.labels.unknown,
                    "fingerprint": self.fingerprint}

        def head_args(device: str) -> tuple:
            return ([(m.model_name, m.pretrained, m.precision) for m in self.members], device,
                    self.prompts.prompts, metadata, self.columns, embedding_dtype, self.carried)

        # On a machine without GPUs whose Ray is this one node, the driver builds the text head
        # (beside Ray's start, when this run starts Ray) instead of one more worker process that
        # would compete with the encoder's start-up for the same few cores; the dataset does not
        # wait for it: the encoders receive it through the job's counter once it is ready.
        stored = self._stored_text_head(metadata, embedding_dtype)
        pool = ThreadPoolExecutor(max_workers=1, initializer=_lower_priority)
        try:
            head_here = _DriverTextHeads(pool, head_args("cpu")) \
                if stored is None and self._local_cpu_only() else None
            dashboard = init_ray()
            if dashboard:
                print(f"clipbatch: Ray dashboard at {dashboard}", flush=True)
            cluster = ray_cluster_info()
            plan = ComputePlan.from_spec(self.spec, cluster["gpus"], cluster["cpus"] / max(1, cluster["nodes"]),
                                         can_grow=cluster["address"] != "local", nodes=cluster["nodes"],
                                         memory_per_node=cluster["memory"] / max(1, cluster["nodes"]),
                                         actor_bytes=self.cpu_actor_bytes, rows_to_do=todo.num_rows,
                                         shards=self.format != "images")
            if plan.gpus_per_actor > cluster["gpus"]:
                print(f"clipbatch: the cluster has {cluster['gpus']:g} GPUs now; encoder actors wait for its "
                      "autoscaler to add GPU nodes", flush=True)
            print(f"clipbatch: {todo.num_rows:,} of {self.listing.num_rows:,} images to do; device {plan.device}, "
                  f"{plan.min_actors}{'' if plan.min_actors == plan.max_actors else '-' + str(plan.max_actors)} "
                  f"encoder actor(s), {plan.gpus_per_actor:g} GPU and {plan.cpus_per_actor:g} CPU each, "
                  f"batch {plan.batch_size}{f', {plan.lanes} lanes' if plan.lanes > 1 else ''}", flush=True)
            if stored is None and head_here is None and plan.device == "cpu" and ray_is_this_machine():
                # A Ray the caller started on this machine (a notebook, a script): the driver has the
                # model code imported already, where a task's fresh worker would import torch and
                # open_clip again (16 s for a tiny model's head on 2 cores, the encoder waiting for it).
                head_here = _DriverTextHeads(pool, head_args("cpu"))
            # On the driver's node, so that losing a worker node never loses the progress count.
            counter = ray.remote(num_cpus=0)(JobCounter).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                   soft=True)).remote()
            if stored is not None:
                prepared, schema = (ray.put(part) for part in stored)
            elif head_here is not None:
                prepared, schema = head_here.through(counter)
            else:
                gpus = plan.gpus_per_actor if plan.device == "cuda" else 0  # logical GPUs compute on CPU
                prepared, schema = ray.remote(_prepare_text_heads).options(
                    num_cpus=0.5, num_gpus=gpus, num_returns=2).remote(*head_args(plan.device))
            ray_ready = time.time()
            sink = ParquetPartsDatasink(self.out.url, self.spec.output.storage_options, schema,
                                        self.spec.output.rows_per_part)
            first_batch_at, steady = None, 0.0
            if todo.num_rows:
                with ProgressReporter(lambda: ray.get(counter.read.remote()), todo.num_rows):
                    dataset = self._dataset(todo, plan, prepared, embedding_dtype, counter)
                    with head_here.interrupting() if head_here is not None else nullcontext():
                        dataset.write_datasink(sink)
                if os.environ.get("CLIPBATCH_RAY_STATS"):
                    print(dataset.stats(), flush=True)
                try:
                    first_batch_at, steady = ray.get(counter.steady_rate.remote())
                except ray.exceptions.RayError:  # the counter's node was lost: the job is fine, these 2 timings are not
                    pass
            if head_here is not None:
                head_here.future.result()  # its error, if it failed while nothing waited for it
        except BaseException:
            if head_here is not None and head_here.failure() is not None:
                raise head_here.failure() from None  # what failed first, as it failed
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        head = ray.get(prepared)
        timings = {"listing_s": round(self.listing_seconds, 3), "ray_start_s": round(ray_ready - t0, 3),
                   "text_head_s": round(head["seconds"] - t0, 3), "inference_s": round(time.time() - ray_ready, 3)}
        if first_batch_at:
            timings["first_batch_s"] = round(first_batch_at - t0, 3)
            if steady:
                timings["steady_img_per_s"] = round(steady, 3)
        return self._finish(sink, head, plan, started, timings)

    @property
    def columns(self) -> list[str]:
        """The embedding column of each model, in member order."""
        return [m.embedding_column for m in self.members]

    def _model_metadata(self) -> dict:
        """Which model(s) made the output: top-level keys for one model, a list for an ensemble."""
        if not self.spec.ensemble:
            return {"model": self.spec.model.name, "pretrained": self.spec.model.pretrained,
                    "preprocess_cfg": self.preprocess_cfg}
        return {"model": "ensemble", "pretrained": None,
                "ensemble": [{"model": spec.name, "pretrained": spec.pretrained, "weight": m.weight,
                              "embedding_column": m.embedding_column, "preprocess_cfg": m.expected_preprocess}
                             for spec, m in zip(self.spec.members, self.members)]}

    def _stored_text_head(self, metadata: dict, embedding_dtype) -> tuple[dict, pa.Schema] | None:
        """The heads an earlier run of this same job saved (_text_head*.npy), so that a resume does
        not build them again; None when there are none or they were made for anything else."""
        if not all(self.out.exists(head_file(c)) for c in self.columns):
            return None
        manifest = self.out.read_manifest()
        if not manifest or manifest.get("fingerprint") != self.fingerprint:
            return None
        runtime = manifest.get("ensemble") or [manifest]
        heads = [{"text_head": self.out.read_head(c), "logit_scale": r["logit_scale"],
                  "logit_bias": r["logit_bias"], "precision": r["precision"]} for c, r in zip(self.columns, runtime)]
        if any(h["text_head"].shape[0] != len(self.classes) for h in heads):
            return None
        return _prepared(heads, metadata, self.columns, embedding_dtype, self.carried)

    def _local_cpu_only(self) -> bool:
        """True when this run starts (or started) its own Ray on a machine without CUDA (a laptop, CI)."""
        import ray
        import torch

        own_ray = started_here() or (not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"))
        return own_ray and self.spec.compute.device != "cuda" and not torch.cuda.is_available()

    def _dataset(self, todo: pa.Table, plan: ComputePlan, prepared, embedding_dtype: str | None, counter):
        import ray
        from clipbatch.decode import read_and_decode
        from clipbatch.shards import read_shards

        inputs = self.spec.input
        # Equal requests let Ray Data fuse the CPU stages into the encoder actors (on CPU, where one
        # more process per batch only competes with the encoders for the same cores).
        stage_cpus = plan.cpus_per_actor if plan.decode_in_actors else DECODE_CPUS
        # The listing's blocks go in as they are: from_blocks reads their sizes here, where from_arrow
        # would wait for a remote task (1.4 s at a job's start, when the first worker is not up yet).
        if self.format == "images":
            per_block = listing_rows_per_block(plan.decode_in_actors, plan.batch_size)
            blocks = [todo.slice(i, per_block) for i in range(0, todo.num_rows, per_block)]
            rows = ray.data.from_blocks(blocks)
        else:  # one shard per block and per reader task
            rows = ray.data.from_blocks([todo.slice(i, 1) for i in range(todo.num_rows)]).map_batches(
                read_shards, batch_size=1, num_cpus=stage_cpus,
                fn_kwargs={"fmt": self.format, "storage_options": inputs.storage_options, "keep": inputs.keep,
                           "image_column": inputs.image_column, "id_column": inputs.id_column,
                           "output_url": self.out.url, "output_storage_options": self.spec.output.storage_options})
        return (rows
                .map_batches(read_and_decode, batch_size=DECODE_BATCH, num_cpus=stage_cpus,
                             fn_kwargs={"preprocess_cfg_json": json.dumps(self.decode_cfgs[0]),
                                        "more_cfgs_json": tuple(json.dumps(c) for c in self.decode_cfgs[1:]),
                                        "storage_options": self.spec.input.storage_options,
                                        "jpeg_draft": self.spec.input.jpeg_draft,
                                        "max_pixels": self.spec.input.max_pixels})
                .map_batches(_CountingEncoder, batch_size=plan.batch_size, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(
                                 min_size=plan.min_actors, max_size=plan.max_actors,
                                 # lanes: Ray Data runs that many of the actor's batches at once, each in
                                 # a thread of its own (torch releases the GIL while it computes)
                                 **({"max_concurrent_calls_per_actor": plan.lanes,
                                     "enable_true_multi_threading": True} if plan.lanes > 1 else {})),
                             num_gpus=plan.gpus_per_actor, num_cpus=plan.cpus_per_actor,
                             fn_constructor_kwargs={
                                 "counter": counter, "prepared": prepared, "members": self.members,
                                 "device": plan.device, "classes": self.classes,
                                 "top_k": self.spec.labels.top_k, "embedding_dtype": embedding_dtype,
                                 "batch_size": plan.batch_size, "torch_threads": plan.torch_threads,
                                 "lanes": plan.lanes,
                                 "carried": self.carried,
                                 "temperature": self.spec.labels.temperature,
                                 "min_score": self.spec.labels.min_score, "unknown": self.spec.labels.unknown}))

    def _finish(self, sink: ParquetPartsDatasink, head: dict, plan: ComputePlan, started: float,
                timings: dict) -> RunSummary:
        metadata = head["metadata"]
        parts = self.out.parts()
        written = self.out.written_rows()
        ids = written["id"].combine_chunks()
        errors = written.num_rows - written["error"].null_count
        unique = pc.count_distinct(ids).as_py() if len(ids) else 0
        if self.format == "images":
            expected = self.listing.num_rows
            complete = len(ids) == unique == expected and pc.all(pc.is_in(self.listing["id"], value_set=ids)).as_py()
        else:  # every shard was read to its end (or its damage recorded) and no row is there twice
            expected = len(ids)
            sources = written["source"].combine_chunks()
            complete = len(ids) == unique and pc.all(pc.is_in(self.listing["source"], value_set=sources)).as_py()
        new_rows = sum(r["rows"] for r in sink.written)
        seconds = time.time() - started
        timings["total_s"] = round(seconds, 3)
        manifest = {**{k: v for k, v in metadata.items() if k != "fingerprint"},
                    "name": self.spec.name, "input": _json_safe(self.spec.input.path),
                    "output": self.out.url, "device": plan.device, "compute": asdict(plan),
                    "ray": ray_cluster_info(),
                    "counts": {"inputs": expected, "rows": len(ids), "errors": errors, "new_rows": new_rows,
                               **({} if self.format == "images" else {"shards": self.listing.num_rows})},
                    "format": self.format,
                    **({"input_columns": {"image_column": self.spec.input.image_column,
                                          "id_column": self.spec.input.id_column}}
                       if self.format == "parquet" else {}),
                    "timings": timings, "parts": [p.rsplit("/", 1)[-1] for p in parts],
                    "fingerprint": self.fingerprint, "complete": complete,
                    "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for column, h in zip(self.columns, head["heads"]):
            self.out.write_head(h["text_head"], column)
        self.out.write_text(MANIFEST, json.dumps(manifest, indent=2))
        if complete:
            self.out.write_text(SUCCESS, "")
        rate = new_rows / timings["inference_s"] if timings["inference_s"] > 0 else 0.0
        return RunSummary(self.out.url, len(ids), errors, new_rows, seconds, rate, plan.device, complete)


def build(spec_or_path, overrides: dict | None = None) -> Job:
    """The one entry point: a spec (path, dict or JobSpec) -> a validated Job."""
    spec = spec_or_path if isinstance(spec_or_path, JobSpec) and not overrides else \
        load_spec(spec_or_path, overrides)
    return Job(spec)
