"""Finishing an output: its text heads, ``_manifest.json``, then ``_SUCCESS`` only when it is complete.

The job and relabel both end here, so ``_SUCCESS`` means the same thing for
both: every input has exactly one row, and the manifest describes them.
"""

from __future__ import annotations

import json
import posixpath
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from clipbatch.output.layout import MANIFEST, SUCCESS, OutputDir


def error_count(rows: pa.Table) -> int:
    """Rows whose error is set."""
    return rows.num_rows - rows["error"].null_count


def finish(out: OutputDir, metadata: dict, heads: dict[str, np.ndarray], fields: dict, complete: bool) -> dict:
    """Write the heads (one per embedding column), the manifest (metadata and fields) and, when
    complete, _SUCCESS, in that order; returns the manifest."""
    for column, head in heads.items():
        out.write_head(head, column)
    manifest = {**{k: v for k, v in metadata.items() if k != "fingerprint"}, **fields,
                "output": out.url, "parts": [posixpath.basename(p) for p in out.parts()],
                "fingerprint": metadata["fingerprint"], "complete": complete,
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out.write_text(MANIFEST, json.dumps(manifest, indent=2))
    if complete:
        out.write_text(SUCCESS, "")
    return manifest
