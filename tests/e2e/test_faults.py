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


POISON = '''
import numpy as np
import open_clip.model

forward = open_clip.model.CLIP.encode_image


def encode_image(self, image, *args, **kwargs):
    # The test's fault: any batch holding a one-colour image fails, on every try.
    if bool((image.flatten(2).std(dim=2) == 0).all(dim=1).any()):  # every channel flat
        raise ValueError("poisoned batch")
    return forward(self, image, *args, **kwargs)


open_clip.model.CLIP.encode_image = encode_image
'''


@pytest.mark.slow
def test_an_error_on_every_try_stops_the_job_in_one_line_and_a_rerun_finishes(slow_job, tmp_path, tiny_model):
    """A forward that raises on some input every time: the job stops, in bounded time, with one line of
    clipbatch's; what it wrote stays valid, and a rerun once the fault is gone writes the rest once."""
    import shutil
    import subprocess
    import sys

    import yaml
    from PIL import Image

    images, _ = slow_job
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    Image.new("RGB", (32, 32), (255, 255, 255)).save(folder / "01500-white.png")  # in a late batch
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(POISON)  # imported by every Python of the job, Ray's workers too
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec_dict(folder, tiny_model, tmp_path / "out", output={"rows_per_part": 64})))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    began = time.time()
    proc = subprocess.run([sys.executable, "-m", "clipbatch.cli", "run", str(job)], capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONPATH": str(hook)})
    seconds = time.time() - began
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and seconds < 240, (seconds, proc.stderr[-3000:])
    assert last.startswith("clipbatch: error: ") and "poisoned batch" in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("clipbatch: error:")[-1]
    written = pq.read_table(tmp_path / "out", columns=["id"])["id"].to_pylist() if list(
        (tmp_path / "out").glob("part-*.parquet")) else []
    assert len(written) == len(set(written)) < N_IMAGES + 1 and not (tmp_path / "out" / "_SUCCESS").exists()
    proc = subprocess.run([sys.executable, "-m", "clipbatch.cli", "run", str(job)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = pq.read_table(tmp_path / "out", columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == N_IMAGES + 1
