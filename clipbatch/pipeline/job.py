"""The one place where the stages are wired together with Ray Data.

``build(spec)`` checks everything that can be checked before any work (models,
prompts, inputs, output) and returns a Job; ``Job.run()`` is Ray's batch-inference
shape: listing (or shard-reader tasks) -> decode -> encoder actor pool -> Parquet
sink, each one ``map_batches`` with its state in the constructor, then the output
is finished (heads, manifest, _SUCCESS).

Fault tolerance is Ray Data's own: its map tasks retry and its pool actors restart
and retry their batches, so a lost worker or node only redoes batches. Retries
never duplicate rows because a part's name is the hash of its ids: a repeated
write replaces the same file.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from clipbatch.errors import UserError
from clipbatch.model.load import gpu_batch_size, parameter_count
from clipbatch.model.members import Member, members_of
from clipbatch.model.prompts import resolve_prompts
from clipbatch.model.scoring import Labeling
from clipbatch.model.text_head import build_heads
from clipbatch.output import resume
from clipbatch.output.finish import error_count, finish
from clipbatch.output.layout import OutputDir
from clipbatch.output.schema import output_metadata, output_schema
from clipbatch.pipeline.decode import decode_configs, read_and_decode
from clipbatch.pipeline.device_decode import on_device, read_for_device
from clipbatch.pipeline.encoder import ClipEncoder
from clipbatch.pipeline.listing import input_format, list_images
from clipbatch.pipeline.plan import ACTOR_OVERHEAD_BYTES, ComputePlan, plan_for
from clipbatch.pipeline.progress import ProgressCounter, ProgressReporter, ShardTotal
from clipbatch.pipeline.session import Cluster, cluster_info, init_ray, wait_for_gpus
from clipbatch.pipeline.shards import carried_name, read_shards
from clipbatch.pipeline.sink import ParquetPartsDatasink
from clipbatch.spec import JobSpec, load_spec

DECODE_BATCH = 32
READER_CPUS = 0.5  # shard readers: mostly I/O
UNREACHABLE = "Could not connect to the endpoint URL"  # botocore's words, for Ray Data's readers to retry


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


class CountingEncoder(ClipEncoder):
    """The encoder, adding each batch's rows to the job's progress counter (keeps encoder.py free of Ray)."""

    def __init__(self, counter, **kwargs):
        self.counter = counter
        super().__init__(**kwargs)
        node = ray.get_runtime_context().get_node_id()[:12]
        print(self.describe(f"{platform.node()} (Ray node {node})"), flush=True)

    def __call__(self, batch):
        table = super().__call__(batch)
        self.counter.add.remote(table.num_rows, error_count(table))
        return table


class Job:
    """A validated job: models checked, prompts resolved, inputs listed; ready to run."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.members = members_of(spec)
        self.prompts = resolve_prompts(spec.labels, spec.input.storage_options)
        self.labeling = Labeling.from_spec(spec.labels, self.prompts.names)
        self.format = input_format(spec.input)
        self.carried = [carried_name(k) for k in spec.input.keep]  # output columns of input.keep
        self.listing = list_images(spec.input)
        self.out = OutputDir(spec.output.path, spec.output.storage_options)
        self.fingerprint = resume.fingerprint(spec, self.prompts)

    def run(self, stats: bool = False) -> RunSummary:
        started = time.time()
        self.out.check_writable()
        if resume.check(self.out, self.fingerprint, self.spec.output.mode):
            manifest, rows, errors = self.out.announce_complete(self.listing.num_rows)
            return RunSummary(self.out.url, rows, errors, 0, time.time() - started, 0.0,
                              manifest.get("device", "?"), True, skipped=True)
        todo = resume.pending(self.listing, self.out, self.format)
        dashboard = init_ray()
        if dashboard:
            print(f"clipbatch: Ray dashboard at {dashboard}", flush=True)
        cluster = cluster_info()
        gpu_batch = min(gpu_batch_size(m.name) for m in self.members)
        plan = plan_for(self.spec.compute, cluster, self._actor_bytes(), gpu_batch)
        if plan.gpus_per_actor > cluster.gpus:  # a running cluster whose autoscaler may add GPU nodes
            cluster = wait_for_gpus(plan.gpus_per_actor, self.spec.compute.wait_for_gpus_s)
            plan = plan_for(self.spec.compute, cluster, self._actor_bytes(), gpu_batch)
        print(f"clipbatch: {todo.num_rows:,} of {self.listing.num_rows:,} "
              f"{'images' if self.format == 'images' else 'shards'} to do; {plan.describe()}", flush=True)
        members, heads = self._text_heads(plan)
        metadata = output_metadata(members, self.prompts, self.labeling, self.fingerprint)
        embedding_dtype = self.spec.output.embedding_dtype if self.spec.output.embeddings else None
        schema = output_schema(len(self.labeling.classes), {m.column: m.embedding_dim for m in members},
                               embedding_dtype, metadata, self.carried)
        sink = ParquetPartsDatasink(self.out.url, self.spec.output.storage_options, schema,
                                    self.spec.output.rows_per_part)
        began = time.time()
        if todo.num_rows:
            counter = _progress_counter()
            total = todo.num_rows if self.format == "images" else \
                ShardTotal(todo.num_rows, pc.sum(pc.list_value_length(todo["done"])).as_py() or 0)
            with ProgressReporter(lambda: ray.get(counter.read.remote()), total):
                dataset = self._dataset(todo, plan, members, heads, schema, counter)
                del todo
                self.forget_sources()
                try:
                    dataset.write_datasink(sink, ray_remote_args={"num_cpus": plan.write_cpus},
                                           concurrency=plan.write_tasks)
                finally:
                    self.out.remove_listing()
            if stats:
                print(dataset.stats(), flush=True)
        new_rows = sum(r["rows"] for r in sink.written)
        rate = new_rows / max(time.time() - began, 1e-9)
        return self._finish(metadata, members, heads, plan, cluster, new_rows, rate, started)

    def forget_sources(self) -> None:
        """Once the rows left are in the listing files, the driver needs only the ids (to check at the end
        that each has its row): at ten million images that lets go of several hundred MB."""
        if self.format == "images":
            self.listing = self.listing.select(["id"])
            pa.default_memory_pool().release_unused()

    def _actor_bytes(self) -> int:
        """One CPU actor's memory: its models' weights and the overhead of a worker with torch."""
        return ACTOR_OVERHEAD_BYTES + sum(parameter_count(m.name) * (2 if m.precision in ("fp16", "bf16") else 4)
                                          for m in self.members)

    def _text_heads(self, plan: ComputePlan) -> tuple[list[Member], list]:
        """Built once per job: in the driver for CPU jobs, in a task placed like an encoder for GPU ones
        (the driver may run where there is no GPU)."""
        if plan.device == "cpu":
            return build_heads(self.members, self.prompts.prompts, "cpu")
        task = ray.remote(build_heads).options(num_cpus=1, num_gpus=plan.gpus_per_actor)
        try:
            return ray.get(task.remote(self.members, self.prompts.prompts, plan.device))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):
                raise UserError(str(exc.cause)) from None
            raise

    def _dataset(self, todo: pa.Table, plan: ComputePlan, members: list[Member], heads: list, schema: pa.Schema,
                 counter) -> ray.data.Dataset:
        rows = self.input_rows(todo, plan.rows_per_block, counter)
        lanes = {"max_concurrent_calls_per_actor": plan.concurrent_batches, "enable_true_multi_threading": True} \
            if plan.concurrent_batches > 1 else {}
        return (self._decoded(rows, [m.preprocess for m in members], plan.decode_cpus)
                .map_batches(CountingEncoder, batch_size=plan.batch_size, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors,
                                                                **lanes),
                             num_gpus=plan.gpus_per_actor, num_cpus=plan.cpus_per_actor,
                             fn_constructor_kwargs={"counter": counter, "members": members, "heads": heads,
                                                    "labeling": self.labeling, "schema": schema,
                                                    "device": plan.device, "torch_threads": plan.torch_threads}))

    def _decoded(self, rows: ray.data.Dataset, preprocess: list[dict], cpus: float) -> ray.data.Dataset:
        """Rows with their pixels, or with input.decode: gpu their JPEGs' bytes for the encoder's device."""
        inputs = self.spec.input
        configs = [json.dumps(c) for c in decode_configs(preprocess)]
        if on_device(inputs.decode, preprocess):  # the members' preprocess is known once they are loaded
            return rows.map_batches(read_for_device, batch_size=DECODE_BATCH, num_cpus=cpus,
                                    fn_kwargs={"preprocess_cfg_json": configs[0], "max_pixels": inputs.max_pixels,
                                               "storage_options": inputs.storage_options})
        return rows.map_batches(read_and_decode, batch_size=DECODE_BATCH, num_cpus=cpus,
                                fn_kwargs={"preprocess_cfg_json": configs[0], "more_cfgs_json": tuple(configs[1:]),
                                           "storage_options": inputs.storage_options,
                                           "jpeg_draft": inputs.jpeg_draft, "max_pixels": inputs.max_pixels})

    def input_rows(self, todo: pa.Table, rows_per_block: int, counter=None) -> ray.data.Dataset:
        """The rows to decode: images read from the listing files by tasks (ten million rows never pass
        through the driver), shards by reader tasks; in blocks of the plan's rows_per_block (a few rows for
        each CPU in the CPU layout, a GPU batch beside GPUs)."""
        if self.format == "images":
            retried = ray.data.DataContext.get_current().retried_io_errors
            retried.extend(e for e in [UNREACHABLE] if e not in retried)
            return ray.data.read_parquet(self.out.write_listing(todo), filesystem=self.out.arrow_filesystem()) \
                .repartition(target_num_rows_per_block=rows_per_block)
        inputs = self.spec.input
        # Readers are tasks of their own (half a CPU: mostly I/O) cut into small blocks: fused into the
        # encoder, a task would take many whole shards and its rows reach the sink only at their end.
        return ray.data.from_blocks([todo.slice(i, 1) for i in range(todo.num_rows)]).map_batches(
            _read_counted_shards, batch_size=1, num_cpus=READER_CPUS,
            fn_kwargs={"counter": counter, "fmt": self.format, "storage_options": inputs.storage_options,
                       "keep": inputs.keep, "image_column": inputs.image_column, "id_column": inputs.id_column,
                       "output_url": self.out.url, "output_storage_options": self.spec.output.storage_options}) \
            .repartition(target_num_rows_per_block=rows_per_block)

    def _finish(self, metadata: dict, members: list[Member], heads: list, plan: ComputePlan, cluster: Cluster,
                new_rows: int, rate: float, started: float) -> RunSummary:
        written = self.out.written_rows()
        ids = written["id"].combine_chunks()
        unique = pc.count_distinct(ids).as_py() if len(ids) else 0
        if self.format == "images":
            expected = self.listing.num_rows
            complete = len(ids) == unique == expected and pc.all(pc.is_in(self.listing["id"], value_set=ids)).as_py()
        else:  # every shard was read to its end (or its damage recorded) and no row is there twice
            expected = len(ids)
            sources = written["source"].combine_chunks()
            complete = len(ids) == unique and pc.all(pc.is_in(self.listing["source"], value_set=sources)).as_py()
        errors = error_count(written)
        seconds = time.time() - started
        counts = {"inputs": expected, "rows": len(ids), "errors": errors, "new_rows": new_rows,
                  **({} if self.format == "images" else {"shards": self.listing.num_rows})}
        inputs = self.spec.input
        fields = {"name": self.spec.name, "input": _json_safe(inputs.path), "device": plan.device,
                  "compute": asdict(plan), "ray": asdict(cluster), "counts": counts, "format": self.format,
                  **({"input_columns": {"image_column": inputs.image_column, "id_column": inputs.id_column}}
                     if self.format == "parquet" else {}),
                  "timings": {"total_s": round(seconds, 3)}}
        finish(self.out, metadata, {m.column: h for m, h in zip(members, heads)}, fields, complete)
        return RunSummary(self.out.url, len(ids), errors, new_rows, seconds, rate, plan.device, complete)

    def describe(self, sample: int = 5) -> str:
        """What `validate` and `run` print before any work: inputs, classes, templates, models, output."""
        s, n = self.spec, self.listing.num_rows
        sources = self.listing.column("source").slice(0, sample).to_pylist()
        total_weight = sum(m.weight for m in self.members)
        prompts = self.prompts
        custom = f"; {len(prompts.custom)} class(es) with synonyms or own prompts" if prompts.custom else ""
        lines = [f"job        {s.name}",
                 f"images     {n:,} found in {_paths(s.input.path)}" if self.format == "images" else
                 f"shards     {n:,} {self.format} shards found in {_paths(s.input.path)}",
                 *[f"           {i}" for i in sources],
                 *(["           ..."] if n > sample else []),
                 f"classes    {len(prompts.names)}: {', '.join(prompts.names[:10])}"
                 f"{' ...' if len(prompts.names) > 10 else ''}",
                 f"templates  {len(prompts.templates)} ({prompts.templates_name}): "
                 f"{prompts.templates[0]!r}{' ...' if len(prompts.templates) > 1 else ''}{custom}"]
        for i, m in enumerate(self.members):
            mixed = f", weight {m.weight / total_weight:.3g} -> {m.column}" if s.ensemble else ""
            pretrained = f" pretrained={m.pretrained}" if m.pretrained else ""
            lines.append(f"{'model' if i == 0 else '':<11}{m.name}{pretrained}, precision {m.precision}{mixed}")
        lines.append(f"device     {s.compute.device} (auto: GPU actors where Ray reports GPUs, else CPU)"
                     if s.compute.device == "auto" else f"device     {s.compute.device}")
        lines.append(f"output     {self.out.url} (mode {s.output.mode})")
        return "\n".join(lines)


def _progress_counter():
    """The job's counter actor, on the driver's node: losing a worker node never loses the count."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0)(ProgressCounter).options(scheduling_strategy=here).remote()


def _read_counted_shards(batch, counter, **kwargs):
    """read_shards, telling the progress counter each shard's rows (how a shard job learns its size)."""
    rows = yield from read_shards(batch, **kwargs)
    if counter is not None:
        counter.shard_read.remote(len(batch["id"]), rows)


def _paths(path: str | list[str]) -> str:
    """input.path as one short line: a long list is shown by its first and last entries."""
    if isinstance(path, str) or len(path) <= 3:
        return str(path)
    return f"{len(path):,} paths: {path[0]} ... {path[-1]}"


def _json_safe(value):
    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def build(spec_or_path, overrides: dict | None = None) -> Job:
    """The one entry point: a spec (path, dict or JobSpec) -> a validated Job."""
    spec = spec_or_path if isinstance(spec_or_path, JobSpec) and not overrides else \
        load_spec(spec_or_path, overrides)
    return Job(spec)
