"""Faults an overnight job meets, on a real local Ray: an encoder process killed mid-job."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

import clipbatch
import helpers
from conftest import spec_dict

N_IMAGES = 2000


@pytest.fixture(scope="module")
def slow_job(tmp_path_factory):
    """Small PNGs and a model slow enough (224-px input) that the job lasts several seconds."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(3)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    vision = {"image_size": 224, "layers": 4, "width": 128, "patch_size": 16, "head_width": 32}
    model = helpers.make_tiny_model(tmp_path_factory.mktemp("models") / "slow", seed=2, vision_cfg=vision)
    return folder, f"local-dir:{model}"


def encoder_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if any("CountingEncoder" in part for part in p.info["cmdline"] or [])]


@pytest.mark.slow
def test_an_encoder_killed_mid_job_redoes_its_batches(slow_job, tmp_path, ray_local):
    """SIGKILL of the encoder actor's process (not the node): Ray restarts it and redoes its batches;
    every input is written exactly once and the job completes."""
    images, model = slow_job
    out = tmp_path / "out"
    finished: dict = {}
    job = threading.Thread(target=lambda: finished.update(summary=clipbatch.run(
        spec_dict(images, model, out, output={"rows_per_part": 64}))))
    job.start()
    deadline = time.time() + 240
    while job.is_alive() and time.time() < deadline and not list(out.glob("part-*.parquet")):
        time.sleep(0.1)
    victims = encoder_processes()
    assert victims and job.is_alive(), "the kill must land while the job runs"
    parts_before = len(list(out.glob("part-*.parquet")))
    for process in victims:
        os.kill(process.pid, signal.SIGKILL)
    job.join(timeout=300)
    summary = finished["summary"]
    assert summary.complete and summary.rows == N_IMAGES
    ids = pq.read_table(out, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == N_IMAGES
    assert parts_before < len(list(out.glob("part-*.parquet")))  # the kill landed part-way
