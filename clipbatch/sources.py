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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif", ".avif", ".heic",
                    ".heif", ".jxl", ".ico", ".ppm", ".pgm")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
SHARD_EXTENSIONS = {"webdataset": (".tar",), "parquet": (".parquet",)}


@dataclass
class _Found:
    fs: object  # the fsspec filesystem the files are on
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


def _wanted(path: str, extensions: tuple[str, ...]) -> bool:
    name = posixpath.basename(path)
    return name.lower().endswith(extensions) and not name.startswith(".")


def _find_one(entry: str, storage_options: dict, extensions: tuple[str, ...], lenient: bool = False) -> _Found:
    fs = filesystem_for(entry, storage_options)
    path = fs._strip_protocol(entry)
    if _has_magic(path):
        matches = fs.glob(path, detail=True)
        return _Found(fs, _glob_root(path), sorted(p for p, info in matches.items() if info["type"] == "file"))
    if fs.isdir(path):
        return _Found(fs, path, sorted(p for p in fs.find(path) if _wanted(p, extensions)))
    if not fs.isfile(path):
        if lenient:  # one shard of a range: the reader records it as an error row
            return _Found(fs, posixpath.dirname(path), [path])
        raise SpecError(f"input.path: {entry} does not exist")
    if path.lower().endswith(LIST_EXTENSIONS):
        return _from_list_file(fs, path, storage_options)
    return _Found(fs, posixpath.dirname(path), [path])


def _from_list_file(list_fs, path: str, storage_options: dict) -> _Found:
    """A text file of URIs, taken as they are (nothing is opened or checked: a missing file becomes an
    error row). Relative entries are relative to the list file's folder."""
    base = list_fs.unstrip_protocol(posixpath.dirname(path)) if not is_local(list_fs) else posixpath.dirname(path)
    with list_fs.open(path, "r", encoding="utf-8") as f:
        uris = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    uris = [u if "://" in u or u.startswith("/") else posixpath.join(base, u) for u in uris]
    if not uris:
        return _Found(list_fs, "", [])
    fs = filesystem_for(uris[0], storage_options)
    files = [fs._strip_protocol(u) for u in uris]
    return _Found(fs, _common_dir(files), files)


def _common_dir(paths: list[str]) -> str:
    if len(paths) == 1:
        return posixpath.dirname(paths[0])
    try:
        return posixpath.commonpath(paths)
    except ValueError:  # absolute and relative paths mixed
        return ""


def _entries(path: str | list[str]) -> list[str]:
    items = [path] if isinstance(path, str) else list(path)
    return [expanded for item in items for expanded in braceexpand(item)]


def filesystem_for(url: str, storage_options: dict):
    fs, _ = fsspec.core.url_to_fs(url, **storage_options)
    return fs


def is_local(fs) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def _one_protocol(entries: list[str]) -> list[str]:
    protocols = {fsspec.core.split_protocol(e)[0] or "file" for e in entries}
    if len(protocols) > 1:
        raise SpecError(f"input.path mixes storage protocols {sorted(protocols)}; use one per job")
    return entries


def _find_or_explain(entry: str, storage_options: dict, extensions, lenient: bool) -> _Found:
    try:
        return _find_one(entry, storage_options, extensions, lenient)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(f"input.path: cannot list {entry}: {redact(f'{type(exc).__name__}: {exc}')}") from None


def input_format(spec: InputSpec) -> str:
    """images | webdataset | parquet; 'auto' decides by the extension of the path(s) given."""
    if spec.format != "auto":
        return spec.format
    paths = [spec.path] if isinstance(spec.path, str) else spec.path
    for fmt, extensions in SHARD_EXTENSIONS.items():
        if all(p.rstrip("/").lower().endswith(extensions) for p in paths):
            return fmt
    return "images"


def list_images(spec: InputSpec) -> pa.Table:
    """All inputs as an Arrow table (id, source), sorted by source, no duplicates.

    For images a row is an image; for webdataset and parquet inputs a row is a shard.
    """
    fmt = input_format(spec)
    extensions = SHARD_EXTENSIONS.get(fmt, IMAGE_EXTENSIONS)
    entries = _entries(spec.path)
    # A missing shard inside a range is an error row, not a failed job; a missing image path is not.
    lenient = fmt != "images" and len(entries) > 1
    found = [_find_or_explain(entry, spec.storage_options, extensions, lenient) for entry in _one_protocol(entries)]
    if lenient and all(not f.fs.exists(file) for f in found for file in f.files):
        raise SpecError(f"input.path: none of the {len(entries)} shards in {spec.path} exists")
    protocols = {str(f.fs.protocol) for f in found if f.files}
    if len(protocols) > 1:
        raise SpecError(f"input.path mixes storage protocols {sorted(protocols)}; use one per job")
    found = [f for f in found if f.files]
    if not found:
        raise SpecError(f"input.path: no {'images' if fmt == 'images' else fmt + ' shards'} found in {spec.path}")
    fs = found[0].fs
    root = found[0].root if len(found) == 1 else _common_dir([f.root + "/" for f in found])
    ids: dict[str, str] = {}
    for group in found:
        for file in group.files:
            ids.setdefault(file, posixpath.relpath(file, root) if root else file.lstrip("/"))
    ordered = sorted(ids)
    local = is_local(fs)
    return pa.table({"id": pa.array([ids[p] for p in ordered], pa.string()),
                     "source": pa.array([p if local else fs.unstrip_protocol(p) for p in ordered], pa.string())})
