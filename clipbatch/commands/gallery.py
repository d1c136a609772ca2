"""Thumbnails of output rows, read back from their sources, and a self-contained HTML page of them.

A row's image lives where the job found it: an image file (``source``), a
member of a WebDataset shard (``id`` is ``<shard>/<key>``) or a row of a
Parquet file (``id`` is ``<file>#<row>`` or the input's id column). Thumbnails
are embedded as data URIs, so the page opens offline and can be mailed around.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict

import fsspec
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from clipbatch.pipeline.rows import fetch_all
from clipbatch.pipeline.shards import image_member, webdataset_samples

THUMBNAIL_PX = 192


def _thumbnail(data: bytes, size: int = THUMBNAIL_PX) -> str:
    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)
        img = ImageOps.exif_transpose(img)
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _tar_members(source: str, ids: set[str], storage_options: dict) -> dict[str, bytes]:
    found = {}
    try:
        with fsspec.open(source, "rb", **storage_options) as f:
            for key, sample in webdataset_samples(f):
                row_id = next((i for i in ids if i == key or i.endswith("/" + key)), None)
                image_ext = image_member(sample)
                if row_id and image_ext:
                    found[row_id] = sample[image_ext]
                    if len(found) == len(ids):
                        break
    except Exception:  # a damaged shard: what was read before the damage still counts
        pass
    return found


def _parquet_rows(source: str, ids: set[str], storage_options: dict, image_column: str,
                  id_column: str | None) -> dict[str, bytes]:
    found = {}
    with fsspec.open(source, "rb", **storage_options) as f:
        table = pq.read_table(f, columns=[image_column] + ([id_column] if id_column else []))
    images = table[image_column].to_pylist()
    if id_column:
        for row_id, data in zip(table[id_column].to_pylist(), images):
            if str(row_id) in ids:
                found[str(row_id)] = data
    else:
        for row_id in ids:
            number = int(row_id.rsplit("#", 1)[1])
            if number < len(images):
                found[row_id] = images[number]
    return found


def thumbnails(rows: list[dict], manifest: dict, storage_options: dict | None = None,
               size: int = THUMBNAIL_PX) -> dict[str, str | None]:
    """{id: data URI, or None where the image cannot be read back} for rows with id and source."""
    storage_options = storage_options or {}
    fmt = manifest.get("format", "images")
    if fmt == "images":  # one file per row: one batched fetch, concurrent on object stores

        contents = dict(zip([r["id"] for r in rows], fetch_all([r["source"] for r in rows], storage_options)))
        return {row_id: _thumbnail_or_none(data, size) for row_id, data in contents.items()}
    by_source = defaultdict(set)
    for row in rows:
        by_source[row["source"]].add(row["id"])
    result: dict[str, str | None] = {}
    for source, ids in by_source.items():
        try:
            if fmt == "webdataset":
                contents = _tar_members(source, ids, storage_options)
            else:
                columns = manifest.get("input_columns", {})
                contents = _parquet_rows(source, ids, storage_options, columns.get("image_column", "image"),
                                         columns.get("id_column"))
        except Exception:
            contents = {}
        result.update({row_id: _thumbnail_or_none(contents.get(row_id), size) for row_id in ids})
    return result


def _thumbnail_or_none(data, size: int) -> str | None:
    """None for an image that is gone, moved, or never was one: the page says so instead of failing."""
    try:
        if data is None or isinstance(data, BaseException):
            return None
        return _thumbnail(data, size)
    except Exception:
        return None

# A page checks itself once loaded: how many of its images decoded (<body data-images=N
# data-broken=M>, and a visible line in #broken when any failed). The tests read it in Chromium.
SELF_CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute("data-images", images.length);
  document.body.setAttribute("data-broken", broken.length);
  if (broken.length) document.getElementById("broken").textContent =
      broken.length + " of " + images.length + " images on this page failed to load";
});
"""


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: {px}px; font-size: 12px; }}
figure img, figure .missing {{ width: {px}px; height: {px}px; object-fit: contain; background: #eee; }}
figure .missing {{ display: flex; align-items: center; justify-content: center; color: #888; }}
figcaption {{ overflow-wrap: anywhere; white-space: pre-line; }}
#broken {{ color: #b00; font-weight: bold; }}
</style></head>
<body><h1>{title}</h1><p>{subtitle}</p><p id="broken"></p><div class="grid">
{figures}
</div><script>{check}</script></body></html>
"""


def gallery_html(title: str, subtitle: str, rows: list[dict], images: dict[str, str | None]) -> str:
    """rows: dicts with id and caption; images: {id: data URI or None}."""
    figures = []
    for row in rows:
        uri = images.get(row["id"])
        picture = (f'<img src="{uri}" alt="{html.escape(row["id"])}">' if uri else
                   '<div class="missing">image not readable</div>')
        figures.append(f"<figure>{picture}<figcaption>{html.escape(row['caption'])}</figcaption></figure>")
    return _PAGE.format(title=html.escape(title), subtitle=html.escape(subtitle), px=THUMBNAIL_PX,
                        figures="\n".join(figures), check=SELF_CHECK_SCRIPT)
