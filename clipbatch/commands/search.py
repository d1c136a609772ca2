"""`clipbatch search`: the exact top-k rows of an output by cosine to a text or image query.

The scan is one DuckDB query over the Parquet parts: DuckDB streams the row
groups on every core, computes ``array_cosine_similarity`` against the
stored embeddings and keeps the best k in a bounded heap, so memory does not
grow with the corpus. It was chosen by measurement over pyarrow + numpy on
1,000,000 rows x 512-d float16 (bench/reuse.py; numbers in docs/performance.md); it
also gives ``--where`` full SQL over the other columns for free.
"""

from __future__ import annotations

import json

import duckdb
import fsspec
import numpy as np
import torch

from clipbatch.commands.gallery import gallery_html, thumbnails
from clipbatch.errors import UserError, one_line
from clipbatch.model.load import LoadedModel
from clipbatch.model.text_head import encode_text
from clipbatch.output.reader import OutputReader
from clipbatch.pipeline.decode import decode_image

SEARCH_MEMORY_LIMIT = "512MB"  # DuckDB's own cap: the scan is streaming, so this is plenty


def text_query(loaded: LoadedModel, text: str) -> np.ndarray:
    """The query text as written (no template), L2-normalized, float32 [D]."""
    with torch.inference_mode():
        tokens = loaded.tokenizer([text]).to(loaded.device)
        features = encode_text(loaded.model, tokens).float()
    return torch.nn.functional.normalize(features, dim=-1)[0].cpu().numpy()


def image_query(loaded: LoadedModel, uri: str, preprocess_cfg: dict, storage_options: dict | None = None
                ) -> np.ndarray:
    """An image (any fsspec URI) decoded and preprocessed exactly as the job did, embedded, float32 [D]."""
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            data = f.read()
        pixels, _, _ = decode_image(data, json.dumps(preprocess_cfg))
    except Exception as exc:
        raise UserError(f"--image {uri}: cannot read it as an image ({one_line(exc)})") from None
    return loaded.embed_images(pixels[None])[0].cpu().numpy()


def _connect(stored: OutputReader, threads: int | None):
    # No progress bar: it would go to stdout, into --json output.
    con = duckdb.connect(config={"memory_limit": SEARCH_MEMORY_LIMIT})
    con.execute("SET enable_progress_bar = false")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if not stored.dir.is_local:
        con.register_filesystem(stored.dir.fs)  # DuckDB reads through the same fsspec store (and creds)
    return con


def part_urls(stored: OutputReader) -> list[str]:
    return stored.parts if stored.dir.is_local else [stored.dir.fs.unstrip_protocol(p) for p in stored.parts]


def search(stored: OutputReader, query: np.ndarray, k: int = 10, where: str | None = None,
           column: str = "embedding", threads: int | None = None) -> list[dict]:
    """Rows [{rank, score, id, source, label}], best first; ties broken by id so results are stable.
    column: the embedding column (an ensemble has one per model)."""
    stored.require_embeddings("search")
    dim = stored.schema.field(column).type.list_size
    if query.shape != (dim,):
        raise UserError(f"the query embedding has {query.shape[0]} dimensions but {stored.url} stores {dim}")
    condition = f"AND ({where})" if where else ""
    sql = (f"SELECT id, source, label, array_cosine_similarity({column}::FLOAT[{dim}], $query::FLOAT[{dim}]) "
           f"AS similarity FROM read_parquet($parts) WHERE {column} IS NOT NULL {condition} "
           f"ORDER BY similarity DESC, id LIMIT {int(k)}")
    con = _connect(stored, threads)
    try:
        rows = con.execute(sql, {"query": query.astype(np.float32).tolist(), "parts": part_urls(stored)}).fetchall()
    except duckdb.Error as exc:
        message = str(exc).strip().splitlines()[0]
        if where:
            raise UserError(f"--where {where!r}: {message}") from None
        raise
    finally:
        con.close()
    return [{"rank": i + 1, "score": float(score), "id": row_id, "source": source, "label": label}
            for i, (row_id, source, label, score) in enumerate(rows)]


def format_results(results: list[dict]) -> str:
    if not results:
        return "no rows match"
    lines = [f"{'rank':>4}  {'score':>7}  {'label':<16}  id  (source)"]
    lines += [f"{r['rank']:>4}  {r['score']:7.4f}  {str(r['label']):<16}  {r['id']}  ({r['source']})"
              for r in results]
    return "\n".join(lines)


def as_json(results: list[dict]) -> str:
    return json.dumps([{k: r[k] for k in ("id", "source", "score", "label")} for r in results], indent=2)


def write_html(path: str, title: str, results: list[dict], stored: OutputReader, storage_options: dict) -> None:
    images = thumbnails(results, stored.manifest, storage_options)
    rows = [{"id": r["id"], "caption": f"#{r['rank']}  {r['score']:.4f}  {r['label'] or ''}\n{r['id']}"}
            for r in results]
    page = gallery_html(title, f"{len(results)} results from {stored.url}", rows, images)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)



def run_search(output: str, text: str | None, image: str | None, k: int, where: str | None, as_json_list: bool,
               html: str | None, storage_options: dict) -> str:
    """`clipbatch search`: the query embedded by the output's (first) model, the scan, what to print."""
    stored = OutputReader(output, storage_options)
    stored.require_embeddings("search")
    member = stored.members[0]  # an ensemble is searched in its first model's embeddings
    loaded = stored.load_model(member, device="cpu")
    query = text_query(loaded, text) if image is None else \
        image_query(loaded, image, member.preprocess, storage_options)
    del loaded  # the model is not needed for the scan
    results = search(stored, query, k, where, column=member.column)
    printed = as_json(results) if as_json_list else format_results(results)
    if html:
        write_html(html, f"clipbatch search: {text or image}", results, stored, storage_options)
        if not as_json_list:
            printed += f"\ngallery: {html}"
    return printed
