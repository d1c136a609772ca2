"""Input listing: a spec's input.path -> a table of (id, source), one row per image.

Any fsspec URL works (local paths, s3://, gs://, ...). A path may be a
directory tree, a glob, a brace range (``shard-{000..099}.jpg``), a list of
paths, or a text file of URIs (``.txt``/``.lst``/``.list``, one per line).
Ids are paths relative to the input root, so they stay the same wherever the
data moves.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import fsspec
import pyarrow as pa
from braceexpand import braceexpand

from clipbatch.config import InputSpec, SpecError
from clipbatch.secrets import redact

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif", ".avif")
LIST_EXTENSIONS = (".txt", ".lst", ".list")


@dataclass
class _Found:
    root: str  # protocol-less directory that ids are relative to
    files: list[str]  # protocol-less file paths


def _has_magic(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _glob_root(pattern: str) -> str:
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if _has_magic(part):
            return "/".join(parts[:i])
    return posixpath.dirname(pattern)


def _is_image(path: str) -> bool:
    name = posixpath.basename(path)
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _find_one(fs, entry: str) -> _Found:
    path = fs._strip_protocol(entry)
    if _has_magic(path):
        matches = fs.glob(path, detail=True)
        return _Found(_glob_root(path), sorted(p for p, info in matches.items() if info["type"] == "file"))
    if fs.isdir(path):
        return _Found(path, sorted(p for p in fs.find(path) if _is_image(p)))
    if not fs.isfile(path):
        raise SpecError(f"input.path: {entry} does not exist")
    if path.lower().endswith(LIST_EXTENSIONS):
        return _from_list_file(fs, path)
    return _Found(posixpath.dirname(path), [path])


def _from_list_file(fs, path: str) -> _Found:
    """A text file of URIs; relative entries are relative to the file's folder."""
    base = posixpath.dirname(path)
    with fs.open(path, "r", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    files = [fs._strip_protocol(line) if "://" in line or line.startswith("/")
             else posixpath.join(base, line) for line in lines]
    return _Found(_common_dir(files), files)


def _common_dir(paths: list[str]) -> str:
    if not paths:
        return ""
    if len(paths) == 1:
        return posixpath.dirname(paths[0])
    return posixpath.commonpath(paths) if all(p.startswith("/") for p in paths) or \
        not any(p.startswith("/") for p in paths) else ""


def _entries(path: str | list[str]) -> list[str]:
    items = [path] if isinstance(path, str) else list(path)
    return [expanded for item in items for expanded in braceexpand(item)]


def filesystem_for(url: str, storage_options: dict):
    fs, _ = fsspec.core.url_to_fs(url, **storage_options)
    return fs


def _source_uri(fs, path: str) -> str:
    return path if "file" in fs.protocol or "local" in fs.protocol else fs.unstrip_protocol(path)


def list_images(spec: InputSpec) -> pa.Table:
    """All inputs as an Arrow table (id, source), sorted by source, no duplicates."""
    entries = _entries(spec.path)
    protocols = {fsspec.core.split_protocol(e)[0] or "file" for e in entries}
    if len(protocols) > 1:
        raise SpecError(f"input.path mixes storage protocols {sorted(protocols)}; use one per job")
    fs = filesystem_for(entries[0], spec.storage_options)
    try:
        found = [_find_one(fs, entry) for entry in entries]
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(f"input.path: cannot list {entries[0]}: {redact(f'{type(exc).__name__}: {exc}')}") \
            from None
    root = found[0].root if len(found) == 1 else _common_dir([f.root + "/" for f in found])
    sources: dict[str, str] = {}
    for group in found:
        for file in group.files:
            sources.setdefault(file, posixpath.relpath(file, root) if root else file.lstrip("/"))
    if not sources:
        raise SpecError(f"input.path: no images found in {spec.path}")
    ordered = sorted(sources)
    return pa.table({"id": pa.array([sources[p] for p in ordered], pa.string()),
                     "source": pa.array([_source_uri(fs, p) for p in ordered], pa.string())})
