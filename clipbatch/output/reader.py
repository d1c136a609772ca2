"""An output read back: its metadata, its parts, its embeddings and the models that made it.

``clipbatch relabel`` and ``clipbatch search`` start here. They never read an
image again: everything they need is in the Parquet parts (L2-normalized
embeddings) and in the metadata that names the model, classes and templates.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipbatch.errors import UserError, one_line
from clipbatch.model.load import LoadedModel
from clipbatch.model.members import Member, current_metadata, members_from_metadata
from clipbatch.output.layout import SUCCESS, OutputDir
from clipbatch.output.schema import read_metadata

# Columns every output has; embedding columns and those carried from the input (input.keep) come on top.
_CONTRACT_COLUMNS = ("id", "source", "width", "height", "label", "score", "top_labels", "top_scores", "scores",
                     "error")


class OutputReader:
    """A clipbatch output folder (local or any fsspec store), opened for reading."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.dir = OutputDir(url, storage_options or {})
        self.url = self.dir.url
        try:
            self.parts = self.dir.parts()
        except Exception as exc:
            raise UserError(f"cannot read {self.url}: {one_line(exc)}") from None
        if not self.parts:
            raise UserError(f"{self.url} holds no clipbatch output (no part-*.parquet files)")
        self.schema = pq.read_schema(self.parts[0], filesystem=self.dir.fs)
        try:
            self.metadata = current_metadata(read_metadata(self.schema))
        except KeyError:
            raise UserError(f"{self.url}: {self.parts[0]} has no clipbatch metadata; "
                            "is this a clipbatch output?") from None
        manifest = self.dir.read_manifest()
        self.manifest = current_metadata(manifest) if manifest else {}
        self.complete = self.dir.exists(SUCCESS)

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def members(self) -> list[Member]:
        return members_from_metadata(self.metadata)

    @property
    def embedding_columns(self) -> list[str]:
        return [m.column for m in self.members if m.column in self.schema.names]

    @property
    def carried(self) -> list[str]:
        """Columns carried from the input (input.keep): neither the contract's nor embeddings."""
        embeddings = {m.column for m in self.members}
        return [n for n in self.schema.names if n not in _CONTRACT_COLUMNS and n not in embeddings]

    @property
    def embedding_dtype(self) -> str | None:
        if not self.embedding_columns:
            return None
        value_type = self.schema.field(self.embedding_columns[0]).type.value_type
        return "float16" if value_type == pa.float16() else "float32"

    def require_embeddings(self, command: str) -> None:
        if self.embedding_dtype is None:
            raise UserError(f"{self.url} holds no embeddings (its job ran with output.embeddings: false), so "
                            f"{command} has nothing to work from; rerun the job with output.embeddings: true")

    def count_rows(self, parts: list[str] | None = None) -> int:
        """Rows in these parts (default: all), from the Parquet footers only."""
        return sum(pq.ParquetFile(p, filesystem=self.dir.fs).metadata.num_rows
                   for p in (self.parts if parts is None else parts))

    def read_part(self, part: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(part, columns=columns, filesystem=self.dir.fs)

    def load_model(self, member: Member, device: str = "auto") -> LoadedModel:
        """A member's model through open_clip's own loader, in fp32; refuses with one line when it cannot
        be loaded (a local-dir that moved, an unreachable hub) or is not the model that made the output."""
        try:
            loaded = member.load(device, precision="fp32")
        except UserError as exc:
            raise UserError(f"cannot load the model that made {self.url}: {exc}") from None
        if member.logit_scale is not None and not np.isclose(loaded.logit_scale, member.logit_scale, rtol=1e-3):
            raise UserError(f"the model loaded as {member.name} has logit scale {loaded.logit_scale:.4g}, but "
                            f"{self.url} was made with {member.logit_scale:.4g}: the weights behind that name changed")
        return loaded


def embeddings_of(table: pa.Table, column: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
    """(stored embeddings of the rows that have one [n_valid, D] as stored (float16 or float32),
    valid mask [n]) from a table with an embedding column."""
    column = table[column].combine_chunks()
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)  # the rows that are not null, in order
    return values.reshape(-1, dim), valid
