"""One job per precision on the same corpus: throughput, and how far fp16/bf16 drift from fp32.

Meant for a GPU machine (`compute.device: auto` picks the GPU); on CPU it runs too, slowly.
Prints one JSON record per precision and the agreement against fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from corpus import make_corpus  # noqa: E402

import clipbatch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default=None, help="tag or checkpoint; default: random weights")
    p.add_argument("--precision", action="append", default=None, help="repeatable; default fp32 and fp16")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="clipbatch-precision-"))
    t0 = time.time()
    make_corpus(work / "images", args.n)
    print(f"corpus: {args.n} JPEGs in {time.time() - t0:.1f} s", flush=True)
    results, tables = {}, {}
    for precision in args.precision or ["fp32", "fp16"]:
        spec = {"name": f"precision-{precision}", "input": {"path": str(work / "images")},
                "model": {"name": args.model, "pretrained": args.pretrained, "precision": precision},
                "labels": {"classes": [f"class {i}" for i in range(100)], "templates": "simple"},
                "output": {"path": str(work / f"out-{precision}"), "mode": "overwrite",
                           "embedding_dtype": "float32"},
                "compute": {"batch_size": args.batch_size if args.batch_size == "auto" else int(args.batch_size)}}
        started = time.time()
        summary = clipbatch.run(spec)
        wall = time.time() - started
        manifest = json.loads((work / f"out-{precision}" / "_manifest.json").read_text())
        results[precision] = {"rows": summary.rows, "errors": summary.errors, "device": summary.device,
                              "wall_s": round(wall, 2), "img_per_s_end_to_end": round(summary.rows / wall, 1),
                              "img_per_s_inference": round(summary.images_per_s, 1),
                              "timings": manifest["timings"], "batch_size": manifest["compute"]["batch_size"]}
        tables[precision] = pq.read_table(work / f"out-{precision}").sort_by("id")
        print(json.dumps({precision: results[precision]}), flush=True)
    base = tables.get("fp32")
    for precision, table in tables.items():
        if base is None or precision == "fp32":
            continue
        a = np.stack(base["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
        b = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        sa = np.stack(base["scores"].to_numpy(zero_copy_only=False))
        sb = np.stack(table["scores"].to_numpy(zero_copy_only=False))
        same_label = float(np.mean(base["label"].to_numpy(zero_copy_only=False) ==
                                   table["label"].to_numpy(zero_copy_only=False)))
        print(json.dumps({f"{precision}_vs_fp32": {"min_cosine": float(cos.min()),
                                                   "max_abs_prob_diff": float(np.abs(sa - sb).max()),
                                                   "same_top1": same_label}}), flush=True)


if __name__ == "__main__":
    main()
