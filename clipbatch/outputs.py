"""An output folder's layout: Parquet parts written atomically, _manifest.json, then _SUCCESS.

Each part appears whole or not at all (on local disks through a temporary name
and a rename, on object stores because a PUT is atomic), and is named after the
ids it holds. _SUCCESS is written last and only when the output is complete.
Jobs (through the Ray sink in sinks.py), relabel and search all go through here.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import SpecError
from clipbatch.secrets import redact
from clipbatch.sources import is_local

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
PART_GLOB = "part-*.parquet"


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

    def write_text(self, name: str, text: str) -> None:
        """Write a small file so that it appears whole."""
        target = self.join(name)
        if self.is_local:
            tmp = self.join(f".{name}.{uuid.uuid4().hex}.tmp")
            self.fs.pipe_file(tmp, text.encode())
            self.fs.mv(tmp, target)
        else:
            self.fs.pipe_file(target, text.encode())

    def check_writable(self) -> None:
        """Fail in seconds, before any work, on a missing bucket or wrong credentials."""
        probe = self.join(f"_clipbatch_write_check_{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as exc:
            raise SpecError(f"output.path: cannot write to {self.url}: "
                            f"{redact(f'{type(exc).__name__}: {exc}')}") from None

    def clear(self) -> None:
        for path in self.parts() + self.leftovers() + [self.join(n) for n in (MANIFEST, SUCCESS)]:
            if self.fs.exists(path):
                self.fs.rm_file(path)

    def leftovers(self) -> list[str]:
        """Temporary files of a run that was killed while writing (never visible as parts)."""
        return self.fs.glob(self.join(".part-*.tmp")) + self.fs.glob(self.join("._*.tmp"))

    def written_rows(self) -> pa.Table:
        """(id, source, error) of every row written so far (parts are atomic, so every part is whole)."""
        schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("error", pa.string())])
        tables = [pq.read_table(p, columns=schema.names, filesystem=self.fs) for p in self.parts()]
        return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()


def write_part(out: OutputDir, table: pa.Table, name: str) -> str:
    """One Parquet part, atomically.

    No dictionary encoding on the float lists (a float16 embedding column reads 5x faster without),
    and column statistics only on the scalar columns, where filters use them: statistics over the
    embedding and scores values made writing 10-20x slower (measured with bench/reuse.py's parts).
    """
    target = out.join(name)
    staging = out.join(f".{name}.{uuid.uuid4().hex[:8]}.tmp") if out.is_local else target
    scalar = [f.name for f in table.schema if not pa.types.is_nested(f.type)]
    with out.fs.open(staging, "wb") as f:
        pq.write_table(table, f, use_dictionary=["source", "label", "error"], compression="snappy",
                       write_statistics=scalar)
    if staging != target:
        out.fs.mv(staging, target)
    return target


def part_name(ids) -> str:
    """A part is named after the ids it holds: a retried write task rewrites the same file
    instead of adding a second copy of its rows, and the same rows always get the same name."""
    digest = hashlib.sha256("\n".join(ids.to_pylist()).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"
