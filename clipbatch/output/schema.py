"""The output table: one row per input image, columns as the design fixes them, and its metadata."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from clipbatch import __version__
from clipbatch.model.members import Member
from clipbatch.model.prompts import ClassPrompts
from clipbatch.model.scoring import Labeling

METADATA_KEY = b"clipbatch"


def output_schema(num_classes: int, embeddings: dict[str, int], embedding_dtype: str | None,
                  metadata: dict | None = None, carried: list[str] = ()) -> pa.Schema:
    """embeddings: column name -> dimension (``embedding`` for one model, ``embedding_<key>`` per
    model of an ensemble); embedding_dtype None means the job keeps no embedding column; carried
    columns (input.keep) come last, as strings."""
    fields = [
        pa.field("id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("top_labels", pa.list_(pa.string())),
        pa.field("top_scores", pa.list_(pa.float32())),
        pa.field("scores", pa.list_(pa.float32(), num_classes)),
    ]
    if embedding_dtype:
        value_type = pa.float16() if embedding_dtype == "float16" else pa.float32()
        fields += [pa.field(name, pa.list_(value_type, dim)) for name, dim in embeddings.items()]
    fields.append(pa.field("error", pa.string()))
    fields += [pa.field(name, pa.string()) for name in carried]
    schema = pa.schema(fields)
    if metadata is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    return schema


def read_metadata(schema: pa.Schema) -> dict:
    return json.loads((schema.metadata or {})[METADATA_KEY])


def matrix(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """fixed_size_list<K> without nulls (scores, embedding of valid rows) -> [N, K] numpy."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = array.type.list_size
    return np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, width)


def output_metadata(members: list[Member], prompts: ClassPrompts, labeling: Labeling, fingerprint: dict) -> dict:
    """What made the output, in its Parquet schema and manifest: the models (always a list), classes,
    templates and labeling, and the fingerprint that a resume must match."""
    return {"clipbatch_version": __version__, "models": [m.metadata() for m in members],
            "classes": prompts.names, "templates": prompts.templates, "templates_name": prompts.templates_name,
            "custom_prompts": prompts.custom, "temperature": labeling.temperature,
            "min_score": labeling.min_score, "unknown": labeling.unknown, "fingerprint": fingerprint}
