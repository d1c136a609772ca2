"""`clipbatch report OUTPUT`: one self-contained HTML page about what a job labeled.

Charts are matplotlib PNGs and thumbnails small JPEGs, both inlined as data
URIs, so the page opens offline, from an object store or as an e-mail
attachment: it loads nothing from anywhere. The output is read through fsspec,
so an output on S3 works like a local one (the page is written next to it).
"""

from __future__ import annotations

import base64
import html
import posixpath
import re
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipbatch.commands import charts
from clipbatch.commands.gallery import SELF_CHECK_SCRIPT, thumbnails
from clipbatch.errors import UserError
from clipbatch.model.members import current_metadata
from clipbatch.output.layout import OutputDir

REPORT_DIR = "_report"  # "_": Parquet readers skip it when reading OUTPUT as a table
COLUMNS = ["id", "source", "width", "height", "label", "score", "error"]
LOWEST = 16            # thumbnails of the least confident images
PER_CLASS = 4          # thumbnails of the most confident images of each class
MAX_GALLERY_CLASSES = 40
THUMB = 112            # thumbnail box, pixels
RATIOS = {"1:1": 1.0, "4:3": 4 / 3, "3:4": 3 / 4, "3:2": 3 / 2, "2:3": 2 / 3, "16:9": 16 / 9, "9:16": 9 / 16}
NO_LABEL = "(no label)"


def error_reason(message: str) -> str:
    """An error message without what varies per image (paths, addresses, numbers), for counting."""
    text = re.sub(r"<[^>]*>|'[^']*'|\"[^\"]*\"", "…", message)
    text = re.sub(r"0x[0-9a-fA-F]+|\d[\d,.x]*", "#", text)
    return text[:90]


def aspect_class(width: np.ndarray, height: np.ndarray) -> list[str]:
    """The common aspect ratio each image is within 1% of (as the seeds' statistics report), or 'other'."""
    ratio = np.asarray(width, float) / np.asarray(height, float)
    names = np.full(len(ratio), "other", dtype=object)
    for name, value in reversed(RATIOS.items()):  # the first listed wins where two are within 1%
        names[np.abs(ratio / value - 1) <= 0.01] = name
    return names.tolist()


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _counts(values: list[str]) -> list[tuple[str, int]]:
    keys, counts = np.unique(np.asarray(values, dtype=object).astype(str), return_counts=True)
    return sorted(zip(keys.tolist(), counts.tolist()), key=lambda kv: (-kv[1], kv[0]))


def _per_label(table: pa.Table, classes: list[str]) -> list[tuple[str, int, float]]:
    """(label, images, mean top-1 probability) of the rows without error, in class order, then
    the rows below labels.min_score as NO_LABEL. One Arrow group-by, however many classes."""
    ok = table.filter(pc.is_null(table["error"]))
    grouped = pa.table({"label": pc.fill_null(ok["label"], NO_LABEL), "score": ok["score"]}).group_by(
        "label").aggregate([("score", "count"), ("score", "mean")])
    found = dict(zip(grouped["label"].to_pylist(),
                     zip(grouped["score_count"].to_pylist(), grouped["score_mean"].to_pylist())))
    return [(c, *found[c]) for c in [*classes, NO_LABEL] if c in found]


def collect(table: pa.Table, classes: list[str]) -> dict:
    """Every number the page shows, from the output columns (no image is read here)."""
    ok = pc.is_null(table["error"]).to_numpy(zero_copy_only=False)
    sized = table.filter(pc.is_valid(table["width"]))
    width = sized["width"].to_numpy(zero_copy_only=False).astype(float)
    height = sized["height"].to_numpy(zero_copy_only=False).astype(float)
    errors = table["error"].drop_null().to_pylist()
    per_label = _per_label(table, classes)
    return {
        "rows": table.num_rows, "ok": int(ok.sum()), "errors": len(errors),
        "class_counts": [(c, n) for c, n, _ in per_label],
        "class_mean_score": [(c, mean) for c, _, mean in per_label],
        "score": table["score"].to_numpy(zero_copy_only=False)[ok].astype(float), "width": width, "height": height,
        "aspect": _counts(aspect_class(width, height)) if len(width) else [],
        "error_reasons": _counts([error_reason(e) for e in errors]) if errors else [],
    }


def _galleries(table: pa.Table, classes: list[str]) -> dict[str, np.ndarray]:
    """Row indices of the least confident images and of the most confident ones of each of the
    largest classes: two sorts of the table, however many classes."""
    ok = pc.is_null(table["error"]).to_numpy(zero_copy_only=False)
    score = np.where(ok, table["score"].fill_null(0).to_numpy(zero_copy_only=False), np.inf)
    galleries = {"lowest confidence": np.argsort(score, kind="stable")[:min(LOWEST, int(ok.sum()))]}
    counts = {c: n for c, n, _ in _per_label(table, classes)}
    shown = set(sorted(classes, key=lambda c: -counts.get(c, 0))[:MAX_GALLERY_CLASSES])
    index = {c: i for i, c in enumerate(classes)}
    label_index = np.array([index.get(c, -1) if c in shown else -1 for c in table["label"].to_pylist()])
    label_index[~ok] = -1
    order = np.lexsort((-np.where(ok, score, 0), label_index))  # by class, then by score, highest first
    starts = np.searchsorted(label_index[order], np.arange(len(classes)))
    ends = np.searchsorted(label_index[order], np.arange(len(classes)), side="right")
    for i, c in enumerate(classes):
        if ends[i] > starts[i]:
            galleries[c] = order[starts[i]:min(ends[i], starts[i] + PER_CLASS)]
    return galleries


def _charts(stats: dict) -> list[tuple[str, str]]:
    out = []
    if stats["class_counts"]:
        names, counts = zip(*stats["class_counts"])
        out.append(("Class distribution", charts.bars(list(names), list(counts), "images per label", "images")))
        names, means = zip(*stats["class_mean_score"])
        out.append(("Mean confidence per class", charts.bars(list(names), list(means), "mean top-1 probability",
                                                             "probability", ylim=(0, 1))))
        out.append(("Confidence", charts.histogram(stats["score"], np.linspace(0, 1, 21),
                                                   "top-1 probability", "probability")))
    if len(stats["width"]):
        out.append(("Image sizes", charts.scatter(stats["width"], stats["height"], "decoded size (before resizing)",
                                                  "width (px)", "height (px)")))
        ratio = stats["width"] / stats["height"]
        out.append(("Aspect ratio", charts.histogram(ratio, np.geomspace(max(ratio.min(), 1e-2) * 0.95,
                                                                         ratio.max() * 1.05 + 1e-9, 25),
                                                     "width / height", "width / height", log_x=True)))
        names, counts = zip(*stats["aspect"])
        out.append(("Common aspect ratios", charts.bars(list(names), list(counts), "images per aspect ratio (±1%)",
                                                        "images")))
    if stats["error_reasons"]:
        names, counts = zip(*stats["error_reasons"][:20])
        out.append(("Errors by reason", charts.bars([n[:40] for n in names], list(counts), "error rows per reason",
                                                    "rows")))
    return [(title, _png_uri(png)) for title, png in out]


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 14px; } td, th { padding: 3px 10px; text-align: left; }
tr:nth-child(even) { background: #f5f5f5; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; } .charts figure { margin: 0; }
.charts img { max-width: 100%; border: 1px solid #eee; }
.gallery { display: flex; flex-wrap: wrap; gap: 8px; }
.gallery figure { margin: 0; width: 124px; font-size: 11px; overflow-wrap: anywhere; }
.gallery img { width: 112px; height: 112px; object-fit: contain; background: #eee; display: block; }
.missing { width: 112px; height: 112px; background: #eee; display: flex; align-items: center;
           justify-content: center; color: #888; }
#broken { color: #b00; font-weight: bold; }
"""



def render(out_url: str, manifest: dict, stats: dict, charts_: list[tuple[str, str]],
           galleries: list[tuple[str, list[dict]]]) -> str:
    e = html.escape
    models = manifest["models"]
    model = " + ".join(f"{m['model']}" + (f" / {m['pretrained']}" if m.get("pretrained") else "")
                       + (f" ({m['weight']:g})" if len(models) > 1 else "") for m in models)
    summary = [("output", out_url), ("model", model), ("classes", len(manifest.get("classes", []))),
               ("templates", f"{len(manifest.get('templates') or [])} ({manifest.get('templates_name', 'custom')})"),
               ("rows", f"{stats['rows']:,}"), ("read and scored", f"{stats['ok']:,}"),
               ("errors", f"{stats['errors']:,}"),
               ("mean confidence", f"{stats['score'].mean():.3f}" if len(stats["score"]) else "–"),
               ("finished", manifest.get("finished_at", "?"))]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>clipbatch report: "
             f"{e(manifest.get('name', out_url))}</title><style>{_STYLE}</style></head><body>",
             f"<h1>clipbatch report: {e(manifest.get('name', ''))}</h1><p id='broken'></p>",
             "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in summary) + "</table>",
             "<h2>Charts</h2><div class='charts'>",
             *[f"<figure><img src='{uri}' alt='{e(title)}'><figcaption>{e(title)}</figcaption></figure>"
               for title, uri in charts_],
             "</div>"]
    if stats["error_reasons"]:
        parts += ["<h2>Errors by reason</h2><table><tr><th>rows</th><th>reason</th></tr>",
                  *[f"<tr><td>{n:,}</td><td>{e(reason)}</td></tr>" for reason, n in stats["error_reasons"]],
                  "</table>"]
    for title, items in galleries:
        parts.append(f"<h2>{e(title)}</h2><div class='gallery'>")
        for item in items:
            picture = (f"<img src='{item['thumb']}' alt='{e(item['id'])}'>" if item["thumb"] else
                       "<div class='missing'>no preview</div>")
            parts.append(f"<figure>{picture}<figcaption>{e(str(item['label']))} {item['score']:.3f}<br>"
                         f"{e(item['id'])}</figcaption></figure>")
        parts.append("</div>")
    parts.append(f"<p>made by clipbatch {e(manifest.get('clipbatch_version', ''))} on "
                 f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}</p>")
    parts.append(f"<script>{SELF_CHECK_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def build_report(output: str, storage_options: dict | None = None) -> str:
    """Write OUTPUT/_report/index.html; returns its URL. Thumbnails are read from the images'
    sources (image files, WebDataset members, Parquet rows) with the same storage options."""
    out = OutputDir(output, storage_options or {})
    manifest = out.read_manifest()
    if manifest is None:
        raise UserError(f"{out.url} has no _manifest.json: is it a clipbatch output?")
    manifest = current_metadata(manifest)
    table = out.read(COLUMNS)
    classes = manifest.get("classes", [])
    stats = collect(table, classes)
    chosen = _galleries(table, classes)
    rows = np.unique(np.concatenate(list(chosen.values()))) if chosen else np.array([], int)
    thumbs: dict[int, str | None] = {}
    if len(rows):
        chosen_rows = table.select(["id", "source"]).take(pa.array(rows)).to_pylist()
        by_id = thumbnails(chosen_rows, manifest, storage_options, size=THUMB)
        thumbs = {int(i): by_id[r["id"]] for i, r in zip(rows, chosen_rows)}
    galleries = []
    for title, indices in chosen.items():
        picked = table.take(pa.array(indices)).to_pylist()
        name = title if title == "lowest confidence" else f"most confident: {title}"
        galleries.append((name, [{"id": r["id"], "label": r["label"] if r["label"] is not None else NO_LABEL,
                                  "score": r["score"], "thumb": thumbs.get(int(i))} for r, i in zip(picked, indices)]))
    page = render(out.url, manifest, stats, _charts(stats), galleries)
    out.write_text(posixpath.join(REPORT_DIR, "index.html"), page)
    return f"{out.url}/{REPORT_DIR}/index.html"
