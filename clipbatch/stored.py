"""An output read back: its metadata, its parts, its embeddings and the model that made it.

``clipbatch relabel`` and ``clipbatch search`` start here. They never read an
image again: everything they need is in the Parquet parts (L2-normalized
embeddings) and in the metadata that names the model, classes and templates.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipbatch.config import SpecError
from clipbatch.schema import read_metadata
from clipbatch.secrets import redact
from clipbatch.outputs import SUCCESS, OutputDir

# Columns every output has; embedding columns and those carried from the input (input.keep) come on top.
_CONTRACT_COLUMNS = ("id", "source", "width", "height", "label", "score", "top_labels", "top_scores", "scores",
                     "error")


def parse_storage_options(items: list[str] | None) -> dict:
    """--storage-option key=value (repeatable) -> fsspec keyword arguments (values parsed as YAML)."""
    import yaml

    from pydantic import TypeAdapter, ValidationError

    from clipbatch.config import StorageOptions

    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--storage-option {item!r}: expected key=value, e.g. endpoint_url=http://host:8333")
        options[key.strip()] = yaml.safe_load(value)
    try:  # the same rule as a spec's storage_options: credentials come from the environment only
        return TypeAdapter(StorageOptions).validate_python(options)
    except ValidationError as exc:
        raise SpecError(f"--storage-option: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def job_members(metadata: dict) -> list[dict]:
    """The model(s) that made an output, from its metadata or manifest: {model, pretrained,
    precision, weight, embedding_column, logit_scale, logit_bias, preprocess_cfg} each; an
    ensemble's list, or the one model as a member of weight 1."""
    if "ensemble" in metadata:
        return [{"weight": 1.0, "logit_bias": None, **m} for m in metadata["ensemble"]]
    keys = ("model", "pretrained", "precision", "logit_scale", "logit_bias", "preprocess_cfg")
    return [{**{k: metadata.get(k) for k in keys}, "weight": 1.0, "embedding_column": "embedding"}]


class StoredOutput:
    """A clipbatch output folder (local or any fsspec store), opened for reading."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.dir = OutputDir(url, storage_options or {})
        self.url = self.dir.url
        try:
            self.parts = self.dir.parts()
        except Exception as exc:
            raise SpecError(f"cannot read {self.url}: {redact(f'{type(exc).__name__}: {exc}')}") from None
        if not self.parts:
            raise SpecError(f"{self.url} holds no clipbatch output (no part-*.parquet files)")
        self.schema = pq.read_schema(self.parts[0], filesystem=self.dir.fs)
        try:
            self.metadata = read_metadata(self.schema)
        except KeyError:
            raise SpecError(f"{self.url}: {self.parts[0]} has no clipbatch metadata; "
                            "is this a clipbatch output?") from None
        self.manifest = self.dir.read_manifest() or {}
        self.complete = self.dir.exists(SUCCESS)

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def members(self) -> list[dict]:
        return job_members(self.metadata)

    @property
    def embedding_columns(self) -> list[str]:
        return [m["embedding_column"] for m in self.members if m["embedding_column"] in self.schema.names]

    @property
    def carried(self) -> list[str]:
        """Columns carried from the input (input.keep): neither the contract's nor embeddings."""
        embeddings = {m["embedding_column"] for m in self.members}
        return [n for n in self.schema.names if n not in _CONTRACT_COLUMNS and n not in embeddings]

    @property
    def embedding_dtype(self) -> str | None:
        if not self.embedding_columns:
            return None
        value_type = self.schema.field(self.embedding_columns[0]).type.value_type
        return "float16" if value_type == pa.float16() else "float32"

    def require_embeddings(self, command: str) -> None:
        if self.embedding_dtype is None:
            raise SpecError(f"{self.url} holds no embeddings (its job ran with output.embeddings: false), so "
                            f"{command} has nothing to work from; rerun the job with output.embeddings: true")

    def count_rows(self, parts: list[str] | None = None) -> int:
        """Rows in these parts (default: all), from the Parquet footers only."""
        return sum(pq.ParquetFile(p, filesystem=self.dir.fs).metadata.num_rows
                   for p in (self.parts if parts is None else parts))

    def read_part(self, part: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(part, columns=columns, filesystem=self.dir.fs)

    def load_model(self, member: dict, device: str = "auto"):
        """A member's model (see members), through open_clip's own loader, in fp32.

        Refuses with one line when it cannot be loaded (a local-dir that moved, an unreachable hub)."""
        from clipbatch.models import load_model, resolve_model_name

        name, pretrained = member["model"], member.get("pretrained")
        try:
            loaded = load_model(resolve_model_name(name), pretrained, device=device, precision="fp32")
        except Exception as exc:
            reason = redact(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            raise SpecError(f"cannot load the model that made {self.url} ({name}"
                            f"{', pretrained=' + pretrained if pretrained else ''}): {reason[:300]}") from None
        stored_scale = member.get("logit_scale")
        if stored_scale is not None and not np.isclose(loaded.logit_scale, stored_scale, rtol=1e-3):
            raise SpecError(f"the model loaded as {name} has logit scale {loaded.logit_scale:.4g}, but {self.url} "
                            f"was made with {stored_scale:.4g}: the weights behind that name changed")
        return loaded


def embeddings_of(table: pa.Table, column: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
    """(stored embeddings of the rows that have one [n_valid, D] as stored (float16 or float32),
    valid mask [n]) from a table with an embedding column."""
    column = table[column].combine_chunks()
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)  # the rows that are not null, in order
    return values.reshape(-1, dim), valid
