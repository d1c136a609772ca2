"""Exactly once after a SIGKILL: kill a running job's whole process group, rerun, compare."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import mixed_images


def start(job, env):
    return subprocess.Popen([sys.executable, "-m", "clipbatch.cli", "run", str(job)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.slow
def test_sigkill_then_rerun_is_exactly_once(tmp_path):
    images = tmp_path / "images"
    mixed_images(images, n=240)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def job(out):
        spec = {"input": {"path": str(images)}, "model": {"name": "clipbatch-demo"},
                "labels": {"classes": ["red circle", "blue square", "green star"], "templates": "simple"},
                "output": {"path": str(out), "rows_per_part": 24, "embedding_dtype": "float32"},
                "compute": {"batch_size": 8}}
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    killed = tmp_path / "killed"
    proc = start(job(killed), env)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(killed.glob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started with it
    proc.wait()
    parts_at_kill = len(list(killed.glob("part-*.parquet")))
    assert 2 <= parts_at_kill and not (killed / "_SUCCESS").exists()
    for part in killed.glob("part-*.parquet"):
        pq.read_metadata(part)  # every visible part is whole

    rerun = subprocess.run([sys.executable, "-m", "clipbatch.cli", "run", str(job(killed))], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (killed / "_SUCCESS").exists()
    assert not list(killed.glob(".*.tmp"))

    clean = tmp_path / "clean"
    uninterrupted = subprocess.run([sys.executable, "-m", "clipbatch.cli", "run", str(job(clean))], env=env,
                                   capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    a = pq.read_table(killed).sort_by("id")
    b = pq.read_table(clean).sort_by("id")
    ids = a["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 240 and ids == b["id"].to_pylist()
    np.testing.assert_allclose(np.stack(a["scores"].to_numpy(zero_copy_only=False)),
                               np.stack(b["scores"].to_numpy(zero_copy_only=False)), atol=1e-6)
    np.testing.assert_allclose(np.stack(a["embedding"].to_numpy(zero_copy_only=False)),
                               np.stack(b["embedding"].to_numpy(zero_copy_only=False)), atol=1e-6)
    assert a["label"].to_pylist() == b["label"].to_pylist()
