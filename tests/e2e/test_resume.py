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

import helpers
from helpers import mixed_images


def start(job, env):
    return subprocess.Popen([sys.executable, "-m", "clipbatch.cli", "run", str(job)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    """Where the killed job reads and writes: local disk, or the SeaweedFS S3 server (input and output)."""
    images = tmp_path / "images"
    mixed_images(images, n=N_IMAGES)
    if request.param == "local":
        yield str(images), str(tmp_path / "killed"), {}
        return
    import s3fs

    s3 = request.getfixturevalue("s3")
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, skip_instance_cache=True)
    bucket = f"resume-{tmp_path.name.lower().replace('_', '-')[-20:]}"
    fs.mkdir(bucket)
    fs.put(str(images) + "/", f"{bucket}/images/", recursive=True)
    yield f"s3://{bucket}/images", f"s3://{bucket}/killed", {"endpoint_url": s3.endpoint}


N_IMAGES = 240
SPEC = {"labels": {"classes": ["red circle", "blue square", "green star"], "templates": "simple"},
        "compute": {"batch_size": 8}}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """About 50 ms per image on one core, so that the 240 images take seconds and the kill lands
    part-way. The bundled demo model did them in about 1.3 s: on a fast machine every part was
    written before the test's poll saw two, and the rerun had nothing left to do."""
    vision = {"image_size": 224, "layers": 12, "width": 256, "patch_size": 16, "head_width": 64}
    return "local-dir:" + str(helpers.make_tiny_model(tmp_path_factory.mktemp("models") / "resume", seed=3,
                                                      vision_cfg=vision))


def job_spec(model: str, source: str, out: str, options: dict) -> dict:
    return {**SPEC, "model": {"name": model}, "input": {"path": source, "storage_options": options},
            "output": {"path": out, "storage_options": options, "rows_per_part": 24, "embedding_dtype": "float32"}}


def write_job(path, model: str, source: str, out: str, options: dict):
    path.write_text(yaml.safe_dump(job_spec(model, source, out, options)))
    return path


def env_without_cluster() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ray_local, model):
    """The same images labeled by an uninterrupted run (in this process's Ray), once for both storages."""
    import clipbatch

    folder = tmp_path_factory.mktemp("uninterrupted")
    mixed_images(folder / "images", n=N_IMAGES)  # the same files: mixed_images is deterministic
    assert clipbatch.run(job_spec(model, str(folder / "images"), str(folder / "clean"), {})).complete
    return pq.read_table(folder / "clean").sort_by("id")


@pytest.mark.slow
def test_sigkill_then_rerun_is_exactly_once(storage, uninterrupted, model, tmp_path):
    """SIGKILL the job's whole process group once two parts are visible, rerun: every input once,
    the same values as an uninterrupted run, no half-written part ever visible. On S3 too."""
    import fsspec

    import clipbatch

    input_path, killed, options = storage
    out_fs, out_root = fsspec.core.url_to_fs(killed, **options)
    env = env_without_cluster()
    job = write_job(tmp_path / "killed.yaml", model, input_path, killed, options)

    def parts() -> list[str]:
        out_fs.invalidate_cache()
        return out_fs.glob(f"{out_root}/part-*.parquet")

    proc = start(job, env)
    deadline = time.time() + 240
    while time.time() < deadline and len(parts()) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started with it
    proc.wait()
    assert len(parts()) >= 2 and not out_fs.exists(f"{out_root}/_SUCCESS")
    # Every visible part is whole.
    kept = sum(pq.read_metadata(part, filesystem=out_fs).num_rows for part in parts())

    # The rerun in this process's Ray (the command line was the run that was killed): it does
    # exactly the rows the visible parts lack.
    rerun = clipbatch.run(job_spec(model, input_path, killed, options))
    assert rerun.complete and rerun.new_rows == N_IMAGES - kept > 0
    assert out_fs.exists(f"{out_root}/_SUCCESS")
    assert not out_fs.glob(f"{out_root}/.*.tmp")

    a = pq.read_table(out_root, filesystem=out_fs).sort_by("id")
    b = uninterrupted
    ids = a["id"].to_pylist()
    assert len(ids) == len(set(ids)) == N_IMAGES and ids == b["id"].to_pylist()
    np.testing.assert_allclose(np.stack(a["scores"].to_numpy(zero_copy_only=False)),
                               np.stack(b["scores"].to_numpy(zero_copy_only=False)), atol=1e-6)
    np.testing.assert_allclose(np.stack(a["embedding"].to_numpy(zero_copy_only=False)),
                               np.stack(b["embedding"].to_numpy(zero_copy_only=False)), atol=1e-6)
    assert a["label"].to_pylist() == b["label"].to_pylist()
