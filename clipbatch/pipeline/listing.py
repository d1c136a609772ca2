"""Input listing: a spec's input.path -> a table of (id, source), one row per image.

Any fsspec URL works (local paths, s3://, gs://, ...). A path may be a
directory tree, a glob, a brace range (``shard-{000..099}.jpg``), a list of
paths, or a text file of URIs (``.txt``/``.lst``/``.list``, one per line).
Ids are paths relative to the input root, so they stay the same wherever the
data moves.

Listing streams: directories are walked one folder at a time and list files are
read line by line, and paths are gathered into Arrow arrays of 64k, so that the
driver holds no Python object per image even for tens of millions of images.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from braceexpand import braceexpand
from fsspec.utils import glob_translate

from clipbatch.errors import UserError, one_line
from clipbatch.output.layout import is_local
from clipbatch.spec import InputSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif", ".avif", ".heic",
                    ".heif", ".jxl", ".ico", ".ppm", ".pgm")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
SHARD_EXTENSIONS = {"webdataset": (".tar",), "parquet": (".parquet",)}


CHUNK = 65_536  # paths per Arrow array while listing


@dataclass
class _Found:
    fs: object  # the fsspec filesystem the files are on
    root: str  # protocol-less directory that ids are relative to
    files: list[pa.Array]  # protocol-less file paths, in chunks

    @property
    def count(self) -> int:
        return sum(len(c) for c in self.files)


def _chunks(paths: Iterable[str]) -> list[pa.Array]:
    chunks, batch = [], []
    for path in paths:
        batch.append(path)
        if len(batch) == CHUNK:
            chunks.append(pa.array(batch, pa.string()))
            batch = []
    if batch:
        chunks.append(pa.array(batch, pa.string()))
    return chunks


def _walk(fs, root: str, maxdepth: int | None = None) -> Iterator[str]:
    """Every file under root, one folder's listing at a time."""
    for folder, _, names in fs.walk(root, maxdepth=maxdepth):
        for name in names:
            yield posixpath.join(folder, name)


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
        root = _glob_root(path)
        pattern = re.compile(glob_translate(path))
        depth = None if "**" in path else path.count("/") - root.count("/")
        return _Found(fs, root, _chunks(p for p in _walk(fs, root, depth) if pattern.match(p)))
    if fs.isdir(path):
        return _Found(fs, path, _chunks(p for p in _walk(fs, path) if _wanted(p, extensions)))
    if not fs.isfile(path):
        if lenient:  # one shard of a range: the reader records it as an error row
            return _Found(fs, posixpath.dirname(path), _chunks([path]))
        raise UserError(f"input.path: {entry} does not exist")
    if path.lower().endswith(LIST_EXTENSIONS):
        return _from_list_file(fs, path, storage_options)
    return _Found(fs, posixpath.dirname(path), _chunks([path]))


def _from_list_file(list_fs, path: str, storage_options: dict) -> _Found:
    """A text file of URIs, taken as they are (nothing is opened or checked: a missing file becomes an
    error row). Relative entries are relative to the list file's folder. Read by Arrow's CSV reader in
    blocks, so ten million lines never become Python strings."""
    base = list_fs.unstrip_protocol(posixpath.dirname(path)) if not is_local(list_fs) else posixpath.dirname(path)
    fs, chunks = None, []
    with list_fs.open(path, "rb") as f:
        # One column per line: no delimiter or quoting that a URI could contain.
        reader = pa_csv.open_csv(
            f, read_options=pa_csv.ReadOptions(column_names=["uri"], block_size=1 << 22, use_threads=False),
            parse_options=pa_csv.ParseOptions(delimiter="\x1f", quote_char=False),
            convert_options=pa_csv.ConvertOptions(column_types={"uri": pa.string()}, strings_can_be_null=False))
        for batch in reader:
            uris = pc.utf8_trim_whitespace(batch.column(0))
            uris = uris.filter(pc.and_(pc.not_equal(uris, ""), pc.invert(pc.starts_with(uris, "#"))))
            relative = pc.invert(pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/")))
            uris = pc.if_else(relative, pc.binary_join_element_wise(base, uris, "/"), uris)
            if len(uris):
                fs = fs or filesystem_for(uris[0].as_py(), storage_options)
                chunks.append(_strip_protocol(fs, uris))
    if not chunks:
        return _Found(list_fs, "", [])
    return _Found(fs, _common_dir_of(chunks), chunks)


def _strip_protocol(fs, uris: pa.Array) -> pa.Array:
    """fsspec's _strip_protocol for every URI: sliced in Arrow where all share the usual prefix."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = f"{protocol}://"
    if not is_local(fs) and pc.all(pc.starts_with(uris, prefix)).as_py() and \
            not pc.any(pc.ends_with(uris, "/")).as_py():
        return pc.utf8_slice_codeunits(uris, len(prefix))
    if is_local(fs) and pc.all(pc.starts_with(uris, "/")).as_py() and \
            not pc.any(pc.match_substring_regex(uris, r"//|/\./|/\.\./|/$")).as_py():
        return uris
    return pa.array([fs._strip_protocol(u) for u in uris.to_pylist()], pa.string())


def _common_dir_of(chunks: list[pa.Array]) -> str:
    """The deepest folder holding every path: that of the smallest and the largest path."""
    smallest = min(pc.min(c).as_py() for c in chunks)
    largest = max(pc.max(c).as_py() for c in chunks)
    return _common_dir([smallest, largest]) if smallest != largest else posixpath.dirname(smallest)


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


def _one_protocol(entries: list[str]) -> list[str]:
    protocols = {fsspec.core.split_protocol(e)[0] or "file" for e in entries}
    if len(protocols) > 1:
        raise UserError(f"input.path mixes storage protocols {sorted(protocols)}; use one per job")
    return entries


def _find_or_explain(entry: str, storage_options: dict, extensions, lenient: bool) -> _Found:
    try:
        return _find_one(entry, storage_options, extensions, lenient)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"input.path: cannot list {entry}: {one_line(exc)}") from None


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
    if lenient and all(not f.fs.exists(file) for f in found for chunk in f.files for file in chunk.to_pylist()):
        raise UserError(f"input.path: none of the {len(entries)} shards in {spec.path} exists")
    protocols = {str(f.fs.protocol) for f in found if f.count}
    if len(protocols) > 1:
        raise UserError(f"input.path mixes storage protocols {sorted(protocols)}; use one per job")
    found = [f for f in found if f.count]
    if not found:
        raise UserError(f"input.path: no {'images' if fmt == 'images' else fmt + ' shards'} found in {spec.path}")
    fs = found[0].fs
    root = found[0].root if len(found) == 1 else _common_dir([f.root + "/" for f in found])
    paths = pa.chunked_array([c for f in found for c in f.files], pa.string())
    del found
    pa.default_memory_pool().release_unused()  # what reading the list file left behind
    if paths.nbytes < 2**31:  # one array sorts without the concatenated copy that a chunked take makes
        paths = pa.chunked_array([paths.combine_chunks()])
    paths = _sorted_unique(paths)
    # Ids are sliced from the sources so that the bare paths can be let go first (tens of millions of rows).
    prefix = "" if is_local(fs) else fs.unstrip_protocol("x")[:-1]
    sources = pc.binary_join_element_wise(prefix, paths, "") if prefix else paths
    del paths
    if root:
        ids = pc.utf8_slice_codeunits(sources, len(prefix) + len(root.rstrip("/")) + 1)
    else:
        ids = pc.utf8_ltrim(pc.utf8_slice_codeunits(sources, len(prefix)), "/")
    listing = pa.table({"id": ids, "source": sources})
    del ids, sources
    pa.default_memory_pool().release_unused()  # the sort's copies
    return listing


def _sorted_unique(paths: pa.ChunkedArray) -> pa.ChunkedArray:
    """Sorted, each once: sorting first makes duplicates neighbours, cheaper than a hash table of
    every path when there are tens of millions."""
    paths = paths.take(pc.sort_indices(paths))
    if len(paths) < 2:
        return paths
    differs = pc.not_equal(paths.slice(1), paths.slice(0, len(paths) - 1))
    if pc.all(differs).as_py():
        return paths
    return paths.filter(pa.chunked_array([pa.array([True]), *differs.chunks]))
