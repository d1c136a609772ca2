"""Search and relabel over a stored output, against the raw read speed measured in the same run.

    python bench/reuse.py                 # 1,000,000 rows x 512-d float16 (ViT-B-32 sized), 100 classes
    python bench/reuse.py --rows 200000   # smaller
    python bench/reuse.py --smoke         # 20,000 rows x 128-d with the bundled demo model: for the tests

The synthetic output is written by clipbatch's own part writer (same schema and
Parquet settings as a job), with random unit embeddings. Measured, each in a
fresh process so peak RSS means something:

  read        pyarrow reads the embedding column of every part (dictionary off: the output contract)
  read-dict   the same column written with pyarrow's default dictionary encoding (a sample of parts)
  numpy-scan  the alternative search: pyarrow read + float16->float32 (torch) + matmul + top-k, 2 threads
  search      clipbatch's search (DuckDB), warm (second query), and with a --where filter
  relabel     clipbatch relabel to 100 classes (text head included; model load excluded from rows/s)

Targets (issue 10): search >= 500,000 rows/s warm with peak memory under 1 GB; relabel >= 100,000
rows/s for 100 classes. Machines here are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROWS_PER_PART = 4096
BENCH_CLASSES = [f"class {i}" for i in range(10)]


def make_output(folder: Path, rows: int, dim: int, model: str) -> Path:
    """A complete clipbatch output with random unit embeddings (reused when already there)."""
    import pyarrow as pa

    from clipbatch.model.members import Member
    from clipbatch.model.scoring import Labeling, fixed_size_lists, label_columns, probabilities
    from clipbatch.output.layout import SUCCESS, OutputDir, write_part
    from clipbatch.output.schema import output_schema

    out = OutputDir(str(folder), {})
    if out.exists(SUCCESS) and json.loads(out.fs.cat_file(out.join("_manifest.json")))["counts"]["rows"] == rows:
        return folder
    out.fs.makedirs(out.root, exist_ok=True)
    out.clear()
    import torch

    member = Member(model, embedding_dim=dim)
    metadata = {"models": [member.metadata()], "classes": BENCH_CLASSES, "templates": ["a photo of a {}."],
                "fingerprint": {"model": model}}
    schema = output_schema(len(BENCH_CLASSES), {"embedding": dim}, "float16", metadata)
    rng = np.random.default_rng(0)
    head = torch.nn.functional.normalize(torch.randn(len(BENCH_CLASSES), dim), dim=-1)
    for start in range(0, rows, ROWS_PER_PART):
        n = min(ROWS_PER_PART, rows - start)
        emb = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((n, dim), dtype=np.float32)), dim=-1)
        valid = np.ones(n, dtype=bool)
        ids = [f"images/{i:08d}.jpg" for i in range(start, start + n)]
        table = pa.Table.from_pydict({
            "id": pa.array(ids), "source": pa.array([f"/data/{i}" for i in ids]),
            "width": pa.array(np.full(n, 640, np.int32)), "height": pa.array(np.full(n, 480, np.int32)),
            **label_columns(probabilities(100.0 * (emb @ head.T).numpy(), False), valid,
                            Labeling(BENCH_CLASSES)),
            "embedding": fixed_size_lists(emb.numpy().astype(np.float16), valid, pa.float16()),
            "error": pa.nulls(n, pa.string())}, schema=schema)
        write_part(out, table, f"part-{start // ROWS_PER_PART:06d}.parquet")
    out.write_text("_manifest.json", json.dumps({"counts": {"rows": rows, "errors": 0}, "format": "images"}))
    out.write_text(SUCCESS, "")
    return folder


def in_fresh_process(code: str) -> dict:
    """Run code (which prints one JSON line last) in a new interpreter; add its peak RSS."""
    prologue = "import json, sys, time\nsys.path.insert(0, %r)\n" % str(Path(__file__).parent.parent)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
    epilogue = ("\nhwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
                "result['peak_rss_mb'] = int(hwm.split()[1]) / 1024\nprint(json.dumps(result))\n")
    done = subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(code) + epilogue], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


READ = """
import glob, pyarrow.parquet as pq
parts = sorted(glob.glob(%(folder)r + '/part-*.parquet'))[:%(max_parts)d]
rows, best = 0, 0.0
for _ in range(2):
    t = time.perf_counter()
    rows = sum(pq.read_table(p, columns=['embedding']).num_rows for p in parts)
    best = max(best, rows / (time.perf_counter() - t))
result = {'rows': rows, 'rows_per_s': best}
"""

NUMPY_SCAN = """
import glob, warnings, numpy as np, pyarrow.parquet as pq, torch
from concurrent.futures import ThreadPoolExecutor
warnings.filterwarnings('ignore')
parts = sorted(glob.glob(%(folder)r + '/part-*.parquet'))
q = torch.nn.functional.normalize(torch.randn(%(dim)d), dim=0)
def best_k(p, k=10):
    column = pq.read_table(p, columns=['embedding'], use_threads=False)['embedding'].combine_chunks()
    e = torch.from_numpy(column.values.to_numpy().reshape(len(column), -1)).float()
    s = (e @ q).numpy()
    i = np.argpartition(-s, k)[:k]
    return s[i]
best = 0.0
for _ in range(2):
    t = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        top = np.sort(np.concatenate(list(pool.map(best_k, parts))))[-10:]
    best = max(best, %(rows)d / (time.perf_counter() - t))
result = {'rows_per_s': best}
"""

SEARCH = """
import numpy as np
from clipbatch.commands.search import search
from clipbatch.output.reader import OutputReader
stored = OutputReader(%(folder)r)
rng = np.random.default_rng(1)
q = rng.standard_normal(%(dim)d).astype(np.float32); q /= np.linalg.norm(q)
t = time.perf_counter(); search(stored, q, k=10); cold = time.perf_counter() - t
q = rng.standard_normal(%(dim)d).astype(np.float32); q /= np.linalg.norm(q)
t = time.perf_counter(); hits = search(stored, q, k=10); warm = time.perf_counter() - t
t = time.perf_counter()
search(stored, q, k=10, where="label = 'class 3' AND score > 0.05")
filtered = time.perf_counter() - t
result = {'cold_rows_per_s': %(rows)d / cold, 'rows_per_s': %(rows)d / warm,
          'where_rows_per_s': %(rows)d / filtered, 'top_score': hits[0]['score']}
"""

RELABEL = """
from clipbatch.commands.relabel import Relabel
job = Relabel(%(folder)r, %(target)r, classes=[f'thing {i}' for i in range(100)], templates=['a photo of a {}.'])
summary = job.run()
result = {'rows': summary.rows, 'rows_per_s': summary.rows_per_s, 'total_s': summary.seconds}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--smoke", action="store_true", help="20,000 rows x 128-d, the demo model")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "clipbatch-bench-reuse"))
    args = parser.parse_args()
    rows, dim, model = (20_000, 128, "clipbatch-demo") if args.smoke else (args.rows, 512, "ViT-B-32")
    work = Path(args.workdir) / f"{model}-{rows}"
    print(f"synthetic output: {rows:,} rows x {dim}-d float16 in {work}", flush=True)
    folder = make_output(work / "output", rows, dim, model)
    dict_copy = work / "dictionary"
    sample_parts = min(25, -(-rows // ROWS_PER_PART))
    if not dict_copy.exists():
        import pyarrow.parquet as pq

        dict_copy.mkdir(parents=True)
        for p in sorted(folder.glob("part-*.parquet"))[:sample_parts]:
            pq.write_table(pq.read_table(p), dict_copy / p.name)  # pyarrow's defaults: dictionary on

    params = {"folder": str(folder), "dim": dim, "rows": rows, "max_parts": 10**9,
              "target": str(work / "relabeled")}
    results = {
        "read": in_fresh_process(READ % params),
        "read_dict": in_fresh_process(READ % {**params, "folder": str(dict_copy), "max_parts": sample_parts}),
        "numpy_scan": in_fresh_process(NUMPY_SCAN % params),
        "search": in_fresh_process(SEARCH % params),
    }
    import shutil

    shutil.rmtree(work / "relabeled", ignore_errors=True)
    results["relabel"] = in_fresh_process(RELABEL % params)

    r = results
    print(f"\n{'what':<34}{'rows/s':>12}{'peak RSS MB':>14}")
    for name, label in [("read", "pyarrow read, dictionary off"), ("read_dict", "pyarrow read, dictionary on"),
                        ("numpy_scan", "pyarrow + torch scan, 2 threads"), ("search", "search (DuckDB), warm"),
                        ("relabel", "relabel, 100 classes")]:
        print(f"{label:<34}{r[name]['rows_per_s']:>12,.0f}{r[name]['peak_rss_mb']:>14,.0f}")
    print(f"{'search, cold (first query)':<34}{r['search']['cold_rows_per_s']:>12,.0f}")
    print(f"{'search with --where':<34}{r['search']['where_rows_per_s']:>12,.0f}")
    print(f"\nsearch / pyarrow read (dictionary off): {r['search']['rows_per_s'] / r['read']['rows_per_s']:.2f}")
    print(f"search / pyarrow + torch scan:          {r['search']['rows_per_s'] / r['numpy_scan']['rows_per_s']:.2f}")
    print(f"read dictionary off / on:                {r['read']['rows_per_s'] / r['read_dict']['rows_per_s']:.2f}")
    print(f"search vs target 500,000 rows/s:         {r['search']['rows_per_s'] / 500_000:.2f}"
          f"  (peak {r['search']['peak_rss_mb']:,.0f} MB vs 1,024)")
    print(f"relabel vs target 100,000 rows/s:        {r['relabel']['rows_per_s'] / 100_000:.2f}")
    print(json.dumps({"rows": rows, "dim": dim, **results}))


if __name__ == "__main__":
    main()
