"""The job's Ray Data sink: write tasks turn blocks of output rows into Parquet parts.

Parts are written by output.layout.write_part (atomic, deterministic names). The
manifest and _SUCCESS are written by the driver once the write has finished,
so _SUCCESS always means "complete".
"""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink

from clipbatch.output.layout import OutputDir, part_name, write_part


class ParquetPartsDatasink(Datasink):
    """Writes output rows as part-*.parquet with the job's schema and metadata."""

    def __init__(self, path: str, storage_options: dict, schema: pa.Schema, rows_per_part: int):
        self.path, self.storage_options, self.schema = path, storage_options, schema
        self.rows_per_part = rows_per_part
        self.written: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_part

    def write(self, blocks: Iterable[pa.Table], ctx) -> dict[str, Any]:
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return {"path": None, "rows": 0, "errors": 0}
        table = pa.concat_tables(tables).cast(self.schema)
        name = part_name(table["id"])
        target = write_part(OutputDir(self.path, self.storage_options), table, name)
        return {"path": target, "rows": table.num_rows,
                "errors": table.num_rows - pc.sum(pc.is_null(table["error"])).as_py()}

    def on_write_complete(self, write_result) -> None:
        self.written = [r for r in write_result.write_returns if r["rows"]]
