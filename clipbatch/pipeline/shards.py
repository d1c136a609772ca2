"""Shard readers: WebDataset tars and Parquet files -> rows of encoded image bytes.

Runs in CPU tasks, one shard per call, yielding small batches so that a large
shard never becomes one huge block. A shard that is missing, empty, truncated
or corrupt never stops the job: the members read before the damage are
processed, and the damage itself becomes an error row ``<shard>#error``.
Rows whose id is listed in ``done`` (a resumed job) are skipped.

When a shard has been read to its end (or to its damage), the reader records
how many rows it holds in the output's ``_shards/`` folder. A resumed job skips
a shard whose recorded count equals its rows already written, instead of
reading the whole shard again only to skip every sample: the count is only a
claim about the shard, so "done" is still decided by the rows in the output.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Generator, Iterator

import fsspec
import numpy as np
import pyarrow.parquet as pq

from clipbatch.errors import one_line
from clipbatch.output.layout import OutputDir
from clipbatch.output.resume import write_shard_record
from clipbatch.pipeline.rows import NO_ERROR
from clipbatch.pipeline.listing import IMAGE_EXTENSIONS
from clipbatch.retry import Patience, is_transient

ROWS_PER_BATCH = 64


def carried_name(key: str) -> str:
    """Output column for an input.keep entry: 'json.url' -> 'json_url'."""
    return key.replace(".", "_")


def _as_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


class _Rows:
    """Accumulates rows and hands them out in batches of ROWS_PER_BATCH."""

    def __init__(self, source: str, keep: list[str]):
        self.source, self.keep = source, keep
        self.rows: list[tuple] = []
        self.seen = 0  # every row of the shard, including those skipped as done
        self.handed_out: set[str] = set()  # ids already passed on, skipped when the shard is read again

    def start_again(self) -> None:
        """Before the shard is read again from its start: rows not yet handed out will be read again."""
        self.rows, self.seen = [], 0

    def is_new(self, row_id: str, done: set) -> bool:
        self.seen += 1
        return row_id not in done

    def add(self, row_id: str, data: bytes | None, error: str, carried: dict) -> None:
        self.rows.append((row_id, data, error, [_as_text(carried.get(k)) for k in self.keep]))

    def full(self) -> bool:
        return len(self.rows) >= ROWS_PER_BATCH

    def flush(self) -> dict[str, np.ndarray]:
        rows, self.rows = self.rows, []
        self.handed_out.update(r[0] for r in rows)
        batch = {"id": np.array([r[0] for r in rows], dtype=object),
                 "source": np.array([self.source] * len(rows), dtype=object),
                 "data": np.array([r[1] for r in rows], dtype=object),
                 "error": np.array([r[2] for r in rows], dtype=object)}
        for i, key in enumerate(self.keep):
            batch[carried_name(key)] = np.array([r[3][i] for r in rows], dtype=object)
        return batch


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def webdataset_samples(f) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for consecutive members sharing a key, as img2dataset writes them."""
    key, sample = None, {}
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = _split_member(member.name)
            if key is not None and member_key != key:
                yield key, sample
                sample = {}
            key = member_key
            sample[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, sample


def image_member(sample: dict[str, bytes]) -> str | None:
    """The extension of a sample's image member (any image extension, e.g. 'jpg' or 'x.png'), or None."""
    return next((e for e in sample if f".{e.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS), None)


def _carried_from_sample(sample: dict[str, bytes], keep: list[str]) -> dict:
    values = {}
    meta = None
    for k in keep:
        if k.startswith("json."):
            if meta is None:
                meta = json.loads(sample["json"]) if "json" in sample else {}
            values[k] = meta.get(k.removeprefix("json."))
        elif k in sample:
            values[k] = sample[k].decode("utf-8", errors="replace")
    return values


def _read_webdataset(f, shard_id: str, rows: _Rows, done: set, keep: list[str]) -> Iterator[dict]:
    samples = 0
    for key, sample in webdataset_samples(f):
        samples += 1
        row_id = f"{shard_id}/{key}"
        image_ext = image_member(sample)
        if not rows.is_new(row_id, done):
            continue
        carried = _carried_from_sample(sample, keep)
        if image_ext is None:
            rows.add(row_id, None, f"no image member (found: {', '.join(sorted(sample))})", carried)
        else:
            rows.add(row_id, sample[image_ext], NO_ERROR, carried)
        if rows.full():
            yield rows.flush()
    if samples == 0:
        raise ValueError("shard holds no samples")


def _read_parquet(f, shard_id: str, rows: _Rows, done: set, keep: list[str], image_column: str,
                  id_column: str | None) -> Iterator[dict]:
    parquet = pq.ParquetFile(f)
    columns = list(dict.fromkeys([image_column, *([id_column] if id_column else []), *keep]))
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise ValueError(f"column(s) {missing} not in shard (has {parquet.schema_arrow.names})")
    row_number = 0
    for record_batch in parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=columns):
        table = record_batch.to_pydict()
        for i, data in enumerate(table[image_column]):
            row_id = str(table[id_column][i]) if id_column else f"{shard_id}#{row_number}"
            row_number += 1
            if not rows.is_new(row_id, done):
                continue
            carried = {k: table[k][i] for k in keep}
            rows.add(row_id, data, NO_ERROR if data else f"no image bytes in column {image_column!r}", carried)
            if rows.full():
                yield rows.flush()


def read_shards(batch: dict[str, np.ndarray], fmt: str, storage_options: dict, keep: list[str],
                image_column: str = "image", id_column: str | None = None, output_url: str | None = None,
                output_storage_options: dict | None = None) -> Generator[dict[str, np.ndarray], None, int]:
    """Ray Data batch of shards {id, source, done} -> batches of {id, source, data, error, <kept>}.
    With output_url, each shard's row count is recorded there once the shard has been read.
    Returns the rows the shards hold (those skipped as done included)."""
    seen = 0
    for shard_id, source, done in zip(batch["id"], batch["source"], batch["done"]):
        shard_id = str(shard_id).removesuffix(".tar") if fmt == "webdataset" else str(shard_id)
        rows = _Rows(str(source), keep)
        done = set(done) if done is not None else set()
        patience = Patience()
        try:
            while True:
                try:
                    with fsspec.open(str(source), "rb", **storage_options) as f:
                        if fmt == "webdataset":
                            yield from _read_webdataset(f, shard_id, rows, done | rows.handed_out, keep)
                        else:
                            yield from _read_parquet(f, shard_id, rows, done | rows.handed_out, keep, image_column,
                                                     id_column)
                    break
                except Exception as exc:  # a store out of reach: wait, then read the shard again
                    patience.wait_or_raise(exc)
                    rows.start_again()
        except Exception as exc:  # a damaged shard: keep what was read, record the damage
            if is_transient(exc):  # the store stayed out of reach: that is not the shard's damage
                raise
            if rows.is_new(f"{shard_id}#error", done):
                rows.add(f"{shard_id}#error", None, f"unreadable shard: {one_line(exc)}", {})
        if rows.rows:
            yield rows.flush()
        if output_url is not None:
            write_shard_record(OutputDir(output_url, output_storage_options or {}), str(source), rows.seen)
        seen += rows.seen
    return seen
