"""Getting each image's bytes, and the per-row rule of both decode UDFs: one image's failure becomes
that row's error, never the batch's."""

from __future__ import annotations

import re

import fsspec
import numpy as np

from clipbatch.errors import one_line
from clipbatch.retry import is_transient, retrying

# The error of a row that decoded fine, until the encoder turns it into a null (an all-null
# column would reach the encoder as float NaNs after Ray's Arrow <-> numpy round trip).
NO_ERROR = ""


def image_error(exc: BaseException) -> str:
    """An image's error as its row says it: one line, without the address of Pillow's buffer object."""
    return re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", one_line(exc, 500))


def fetch_all(sources: list[str], storage_options: dict) -> list:
    """One fetch for the whole batch (concurrent on object stores), in order, failures as values
    (a store out of reach is waited for instead).

    cat_ranges, unlike cat, never treats a name with [] or * in it as a glob.
    """
    if not sources:
        return []
    fs, _ = fsspec.core.url_to_fs(sources[0], **storage_options)
    paths = [fs._strip_protocol(s) for s in sources]

    def fetch() -> list:
        results = fs.cat_ranges(paths, None, None, on_error="return")
        # Storage out of reach is waited for (retry.py): it says nothing about the images.
        unreachable = next((r for r in results if isinstance(r, BaseException) and is_transient(r)), None)
        if unreachable is not None:
            raise unreachable
        return results

    return retrying(fetch)


def batch_contents(batch: dict[str, np.ndarray], storage_options: dict) -> tuple[list, np.ndarray]:
    """(each row's bytes or the exception fetching it raised, each row's error so far): shard rows
    bring their bytes and the reader's error; image rows are fetched here."""
    if "data" in batch:
        return batch["data"], np.array([str(e) if e else NO_ERROR for e in batch["error"]], dtype=object)
    return fetch_all([str(s) for s in batch["source"]], storage_options), np.full(len(batch["id"]), NO_ERROR, object)


def for_each_image(contents, errors: np.ndarray, handle) -> None:
    """handle(i, data) for each row without an error yet; whatever it (or the row's fetch) raised
    becomes that row's error: one image's failure never stops its batch."""
    for i, data in enumerate(contents):
        if errors[i] != NO_ERROR:
            continue
        try:
            if isinstance(data, BaseException):
                raise data
            handle(i, data)
        except Exception as exc:
            errors[i] = image_error(exc)
