"""Faults an overnight job meets, on a real local Ray: an encoder process killed mid-job, an error on
every try, the object store gone for a while, a full output disk."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

import clipbatch
import helpers
import s3server
from conftest import spec_dict

N_IMAGES = 2000
S3_IMAGES = 500  # uploaded to the S3 server
FULL_DISK_IMAGES = 800


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


@pytest.fixture
def own_s3(tmp_path):
    """A SeaweedFS of this test's own: the test stops it."""
    server = s3server.start(tmp_path / "seaweedfs")
    yield server
    server.stop()


@pytest.mark.slow
def test_the_object_store_gone_for_20_seconds_is_waited_for(own_s3, slow_job, tmp_path, ray_local):
    """The S3 server is stopped for 20 s while a job reads its images from it and writes parts to it,
    then started again on the same ports and data: the job finishes, every input once, and no image
    became an error row for the outage."""
    import s3fs

    images, model = slow_job
    fs = s3fs.S3FileSystem(endpoint_url=own_s3.endpoint, skip_instance_cache=True)
    fs.mkdir("night")
    fs.put(sorted(str(p) for p in images.glob("*.png"))[:S3_IMAGES], "night/images/")
    spec = spec_dict("s3://night/images", model, "s3://night/out", output={"rows_per_part": 64})
    spec["input"]["storage_options"] = spec["output"]["storage_options"] = {"endpoint_url": own_s3.endpoint}
    finished: dict = {}
    job = threading.Thread(target=lambda: finished.update(summary=clipbatch.run(spec)))
    job.start()
    deadline = time.time() + 240
    while job.is_alive() and time.time() < deadline and len(fs.glob("night/out/part-*.parquet", refresh=True)) < 2:
        time.sleep(0.5)
    assert job.is_alive(), "the outage must fall while the job runs"
    own_s3.stop()
    time.sleep(20)
    assert job.is_alive(), "the job waits for its store"
    own_s3.restart()
    job.join(timeout=400)
    summary = finished["summary"]
    assert summary.complete and summary.rows == S3_IMAGES and summary.errors == 0
    fs.invalidate_cache()
    ids = pq.read_table("night/out", filesystem=fs, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == S3_IMAGES


@pytest.mark.slow
def test_a_full_output_disk_stops_in_one_line_and_a_rerun_completes(slow_job, tmp_path, tiny_model):
    """The output is a tmpfs too small for it: the job stops with one line naming the cause, no part is
    left half-written, and once there is room a rerun writes the rest, every input once."""
    import subprocess
    import sys

    import yaml

    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(slow_job[0].glob("*.png"))[:FULL_DISK_IMAGES]:
        shutil.copy(path, images)
    out = tmp_path / "out"
    out.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(out)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"this machine cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(spec_dict(images, tiny_model, out, output={"rows_per_part": 64})))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        run = [sys.executable, "-m", "clipbatch.cli", "run", str(job)]
        proc = subprocess.run(run, capture_output=True, text=True, timeout=300, env=env)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and "no space left on the device of output.path" in last, proc.stderr[-3000:]
        assert last.startswith("clipbatch: error: "), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr.split("clipbatch: error:")[-1], proc.stderr[-3000:]
        parts = list(out.glob("part-*.parquet"))
        assert parts and all(pq.read_metadata(p).num_rows for p in parts)  # every part whole
        assert not list(out.glob(".part-*")) and not (out / "_SUCCESS").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
        proc = subprocess.run(run, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ids = pq.read_table(out, columns=["id"])["id"].to_pylist()
        assert len(ids) == len(set(ids)) == FULL_DISK_IMAGES and (out / "_SUCCESS").exists()
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)
