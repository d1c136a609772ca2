"""The output as its own checkpoint: what is already written decides what is left to do.

A job (and relabel) first applies ``output.mode`` and refuses to mix results that
differ in anything that decides them (the fingerprint); then the inputs still to
do are the listing minus the ids in the parts. Shard inputs only know their rows
once read, so a shard reader records each shard's row count under ``_shards/``
when it reaches its end, and a shard is skipped when its recorded count equals
its rows written (the count is only a claim: "done" is still decided by the rows).
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipbatch.errors import UserError
from clipbatch.model.prompts import ClassPrompts
from clipbatch.output.layout import MANIFEST, SUCCESS, OutputDir
from clipbatch.output.schema import read_metadata
from clipbatch.spec import JobSpec

SHARD_INDEX = "_shards"  # folder of the output: one small JSON per shard read to its end


def fingerprint(spec: JobSpec, prompts: ClassPrompts) -> dict:
    """What decides the results: a resume must not mix outputs that differ in any of it."""
    labels, members = spec.labels, spec.model_specs

    def each(attr: str):
        values = [getattr(m, attr) for m in members]
        return values if spec.ensemble else values[0]

    return {"model": each("name"), "pretrained": each("pretrained"), "precision": each("precision"),
            **({"weights": each("weight"), "keys": each("column_key")} if spec.ensemble else {}),
            "classes": prompts.names, "templates": prompts.templates, "prompts": prompts.digest(),
            "temperature": labels.temperature, "min_score": labels.min_score, "unknown": labels.unknown,
            "embedding_dtype": spec.output.embedding_dtype if spec.output.embeddings else None}


def check(out: OutputDir, expected: dict, mode: str = "resume",
          advice: str = "use another output.path or output.mode: overwrite") -> bool:
    """Apply the output mode and refuse results made otherwise; True when the output is already complete.
    Half-written files of a killed run (never parts) are removed."""
    parts = out.parts()
    existing = bool(parts) or out.exists(MANIFEST) or out.exists(SUCCESS)
    if existing and mode == "error":
        raise UserError(f"output.path {out.url} already holds output (output.mode is error)")
    if existing and mode == "overwrite":
        out.clear()
        parts = []
    if parts:
        earlier = read_metadata(pq.read_schema(parts[0], filesystem=out.fs)).get("fingerprint") or {}
        if earlier != expected:
            changed = sorted(k for k in set(expected) | set(earlier) if earlier.get(k) != expected.get(k))
            raise UserError(f"{out.url} already holds other results (made with a different "
                            f"{', '.join(changed)}); {advice}")
    for leftover in out.leftovers():
        out.fs.rm_file(leftover)
    return out.exists(SUCCESS)


def pending(listing: pa.Table, out: OutputDir, fmt: str) -> pa.Table:
    """Images: the listing minus what is written. Shards: the shards not known to be finished, each
    with the ids of its rows already written (``done``), for the reader to skip."""
    written = out.written_rows()
    if fmt == "images":
        if not written.num_rows:  # no copy of a listing of millions
            return listing
        return listing.filter(pc.invert(pc.is_in(listing["id"], value_set=written["id"].combine_chunks())))
    by_shard = written.group_by("source").aggregate([("id", "list")])
    done = dict(zip(by_shard["source"].to_pylist(), by_shard["id_list"].to_pylist()))
    records = read_shard_records(out) if done else {}
    sources = listing["source"].to_pylist()
    unfinished = [records.get(s) != len(done.get(s, [])) for s in sources]
    listing = listing.append_column("done", pa.array([done.get(s, []) for s in sources], pa.list_(pa.string())))
    return listing.filter(pa.array(unfinished, pa.bool_()))


def shard_record_name(source: str) -> str:
    return f"{SHARD_INDEX}/{hashlib.sha256(source.encode()).hexdigest()[:24]}.json"


def write_shard_record(out: OutputDir, source: str, rows: int) -> None:
    out.write_text(shard_record_name(source), json.dumps({"source": source, "rows": rows}))


def read_shard_records(out: OutputDir) -> dict[str, int]:
    """{shard source: rows it holds} for every shard an earlier run read to its end."""
    paths = out.fs.glob(out.join(f"{SHARD_INDEX}/*.json"))
    if not paths:
        return {}
    records = [json.loads(c) for c in out.fs.cat(paths).values()]  # one concurrent fetch on object stores
    return {r["source"]: r["rows"] for r in records}
