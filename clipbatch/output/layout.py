"""An output folder's layout: Parquet parts written atomically, _manifest.json, then _SUCCESS.

Each part appears whole or not at all (on local disks through a temporary name
and a rename, on object stores because a PUT is atomic), and is named after the
ids it holds. _SUCCESS is written last and only when the output is complete.
Jobs (through the Ray sink), relabel and search all go through here.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from clipbatch.errors import UserError, one_line
from clipbatch.retry import retrying

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
TEXT_HEAD = "_text_head.npy"  # [C, D] float32: the job's zero-shot head, for eval
PART_GLOB = "part-*.parquet"
LISTING = "_listing"  # the images still to do, as Parquet files that the job's read tasks take in turn
LISTING_ROWS_PER_FILE = 100_000


def is_local(fs) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def head_file(embedding_column: str = "embedding") -> str:
    """_text_head.npy for one model; _text_head.embedding_<key>.npy for each model of an ensemble."""
    return TEXT_HEAD if embedding_column == "embedding" else f"_text_head.{embedding_column}.npy"


class OutputDir:
    """An output folder on any fsspec filesystem."""

    def __init__(self, path: str, storage_options: dict):
        self.url = path.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.storage_options = storage_options
        self.is_local = is_local(self.fs)

    def join(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.join(name))

    def parts(self) -> list[str]:
        return sorted(self.fs.glob(self.join(PART_GLOB)))

    def read_manifest(self) -> dict | None:
        if not self.exists(MANIFEST):
            return None
        return json.loads(self.fs.cat_file(self.join(MANIFEST)))

    def announce_complete(self, rows_if_unknown: int = 0) -> tuple[dict, int, int]:
        """Say that this output is already complete (a rerun has nothing to do):
        (its manifest, rows, errors)."""
        manifest = self.read_manifest() or {}
        counts = manifest.get("counts", {})
        rows = counts.get("rows", rows_if_unknown)
        print(f"clipbatch: {self.url} is already complete ({rows:,} rows); nothing to do", flush=True)
        return manifest, rows, counts.get("errors", 0)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small file so that it appears whole (waiting for a store out of reach)."""
        retrying(lambda: self._write_bytes(name, data))

    def _write_bytes(self, name: str, data: bytes) -> None:
        target = self.join(name)
        if self.is_local:
            folder, base = posixpath.split(target)
            tmp = posixpath.join(folder, f".{base}.{uuid.uuid4().hex}.tmp")
            self.fs.makedirs(folder, exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def write_head(self, head: np.ndarray, embedding_column: str = "embedding") -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(head, np.float32))
        self.write_bytes(head_file(embedding_column), buf.getvalue())

    def read_head(self, embedding_column: str = "embedding") -> np.ndarray:
        return np.load(io.BytesIO(self.fs.cat_file(self.join(head_file(embedding_column)))))

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The rows written so far (every part is whole), with only the columns asked for."""
        # Threads: on an object store each part is a few round trips, and a million rows are hundreds of parts.
        with ThreadPoolExecutor(16) as pool:
            tables = list(pool.map(lambda p: pq.read_table(p, columns=columns, filesystem=self.fs), self.parts()))
        if not tables:
            raise FileNotFoundError(f"{self.url} holds no part-*.parquet")
        return pa.concat_tables(tables, promote_options="permissive")

    def check_writable(self) -> None:
        """Fail in seconds, before any work, on a missing bucket or wrong credentials."""
        probe = self.join(f"_clipbatch_write_check_{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as exc:
            raise UserError(f"output.path: cannot write to {self.url}: {one_line(exc)}") from None

    def write_listing(self, table: pa.Table) -> list[str]:
        """The rows still to do as _listing/*.parquet (replacing an earlier run's), so that the job reads
        them in tasks instead of the driver holding and sending every row; returns their paths."""
        self.remove_listing()
        self.fs.makedirs(self.join(LISTING), exist_ok=True)
        paths = []
        for i, start in enumerate(range(0, table.num_rows, LISTING_ROWS_PER_FILE)):
            paths.append(self.join(f"{LISTING}/listing-{i:05d}.parquet"))
            with self.fs.open(paths[-1], "wb") as f:
                pq.write_table(table.slice(start, LISTING_ROWS_PER_FILE), f, compression="snappy")
        return paths

    def remove_listing(self) -> None:
        for path in self.fs.glob(self.join(f"{LISTING}/*.parquet")):
            self.fs.rm_file(path)

    def arrow_filesystem(self):
        """This folder's filesystem as Ray Data's readers take it (None: local paths need none)."""
        if self.is_local:
            return None
        return PyFileSystem(FSSpecHandler(self.fs))

    def clear(self) -> None:
        self.remove_listing()
        heads = self.fs.glob(self.join("_text_head*.npy")) + self.fs.glob(self.join("_shards/*.json"))
        for path in self.parts() + self.leftovers() + heads + [self.join(n) for n in (MANIFEST, SUCCESS)]:
            if self.fs.exists(path):
                self.fs.rm_file(path)

    def leftovers(self) -> list[str]:
        """Temporary files of a run that was killed while writing (never visible as parts)."""
        return self.fs.glob(self.join(".part-*.tmp")) + self.fs.glob(self.join("._*.tmp"))

    def written_rows(self) -> pa.Table:
        """(id, source, error) of every row written so far (parts are atomic, so every part is whole)."""
        schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("error", pa.string())])
        try:
            return self.read(schema.names).cast(schema)
        except FileNotFoundError:
            return schema.empty_table()


def write_part(out: OutputDir, table: pa.Table, name: str) -> str:
    """One Parquet part, atomically.

    No dictionary encoding on the float lists (a dictionary-encoded float16 column reads several
    times slower), and column statistics only on the scalar columns, where filters use them:
    statistics over the embedding and scores values made writing many times slower (bench/reuse.py).
    """
    target = out.join(name)
    return retrying(lambda: _write_part_once(out, table, target))


def _write_part_once(out: OutputDir, table: pa.Table, target: str) -> str:
    staging = out.join(f".{posixpath.basename(target)}.{uuid.uuid4().hex[:8]}.tmp") if out.is_local else target
    scalar = [f.name for f in table.schema if not pa.types.is_nested(f.type)]
    try:
        with out.fs.open(staging, "wb") as f:
            pq.write_table(table, f, use_dictionary=["source", "label", "error"], compression="snappy",
                           write_statistics=scalar)
    except OSError as exc:
        if out.is_local and out.fs.exists(staging):
            out.fs.rm_file(staging)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(exc.errno, f"no space left on the device of output.path {out.url} "
                                     f"({table.num_rows:,} rows were being written; free space and run "
                                     f"again: what was written is kept)") from None
        raise
    if staging != target:
        out.fs.mv(staging, target)
    return target


def part_name(ids) -> str:
    """A part is named after the ids it holds: a retried write task rewrites the same file
    instead of adding a second copy of its rows, and the same rows always get the same name."""
    digest = hashlib.sha256("\n".join(ids.to_pylist()).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"
