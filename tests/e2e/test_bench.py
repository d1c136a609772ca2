"""The benchmark harness runs (smoke mode: a few small images and the bundled demo model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "throughput.py"


def run_bench(tmp_path, *args) -> dict:
    out = tmp_path / "record.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(BENCH), "--workdir", str(tmp_path), "--json", str(out), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_compare(tmp_path):
    record = run_bench(tmp_path, "--smoke")["compare"]
    assert record["d_clipbatch"]["rows"] == record["n"] == 48
    per_core = {"d/c1"} if os.cpu_count() > 1 else set()
    assert set(record["ratios"]) == {"d/a", "d/b", "d/c", "d/b_in_process"} | per_core
    assert record.get("c1_forward_per_core", 1) > 0
    assert all(v > 0 for v in record["ratios"].values())
    assert record["d_clipbatch"]["driver_peak_rss_mb"] > 0 and record["d_clipbatch"]["worker_peak_rss_mb"] > 0
    assert all(f["ray_job_s"] > 0 and f["model_start_s"] > 0 for f in record["f_floor"])
    ceiling = record.get("c1_forward_per_core", record["c_forward"])
    assert record["floor_s"] > 0 and 0 < record["best_d_img_per_s"] < ceiling


def test_listing_plans_without_reading(tmp_path):
    record = run_bench(tmp_path, "--listing", "20000")["listing"]
    assert record["uris"] == 20000 and record["plan_s"] < 60


def test_reuse_bench_smoke(tmp_path):
    """bench/reuse.py end to end on 20,000 rows: every measurement is there, and search finds a real top score."""
    proc = subprocess.run([sys.executable, str(BENCH.parent / "reuse.py"), "--smoke", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["rows"] == 20000 and record["relabel"]["rows"] == 20000
    for name in ("read", "read_dict", "numpy_scan", "search", "relabel"):
        assert record[name]["rows_per_s"] > 0 and record[name]["peak_rss_mb"] > 0
    assert 0.2 < record["search"]["top_score"] <= 1.0  # the best of 20,000 random 128-d unit vectors
    assert "search vs target 500,000 rows/s" in proc.stdout
