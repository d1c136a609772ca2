"""Input and output on a real S3 server (SeaweedFS): same results as local, credentials kept secret."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs

import clipbatch
import s3server
from conftest import s3_library_spec, spec_dict


def test_anonymous_requests_are_refused(s3, pets_bucket):
    anon = s3fs.S3FileSystem(anon=True, endpoint_url=s3.endpoint, skip_instance_cache=True)
    with pytest.raises(PermissionError):
        anon.ls("pets/images")


def test_s3_in_s3_out_equals_local(pets_bucket, tiny_model, s3_library_run, library_run):
    summary = s3_library_run
    assert summary.complete and summary.rows == 24 and summary.output == "s3://pets/out"
    assert pets_bucket.exists("pets/out/_SUCCESS") and pets_bucket.exists("pets/out/_manifest.json")
    remote = pq.read_table("pets/out", filesystem=pets_bucket).sort_by("id")

    local, out = library_run(tiny_model)  # the same job on local disk
    assert local.complete
    here = pq.read_table(out).sort_by("id")
    assert remote["id"].to_pylist() == here["id"].to_pylist()
    assert all(s.startswith("s3://pets/images/") for s in remote["source"].to_pylist())
    np.testing.assert_allclose(np.stack(remote["scores"].to_numpy(zero_copy_only=False)),
                               np.stack(here["scores"].to_numpy(zero_copy_only=False)), atol=1e-6)
    np.testing.assert_allclose(np.stack(remote["embedding"].to_numpy(zero_copy_only=False)),
                               np.stack(here["embedding"].to_numpy(zero_copy_only=False)), atol=1e-6)
    manifest = pets_bucket.cat_file("pets/out/_manifest.json").decode()
    assert s3server.SECRET_KEY not in manifest and s3server.ACCESS_KEY not in manifest


def _cli(args, env_changes, tmp_path):
    env = {**os.environ, **env_changes, "RAY_ADDRESS": ""}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "clipbatch.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    return proc, time.time() - started


@pytest.mark.parametrize("where", ["input", "output"])
def test_wrong_credentials_fail_fast_without_leaking(s3, pets_bucket, images, tiny_model, tmp_path, where):
    import yaml

    spec = s3_library_spec(s3, tiny_model, out="s3://pets/wrong-creds")
    if where == "output":
        spec["input"] = {"path": str(images)}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    wrong_secret = "WRONG-secret-value-9f8e7d"
    proc, seconds = _cli(["run", str(path)], {"AWS_SECRET_ACCESS_KEY": wrong_secret}, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert seconds < 30, seconds
    error_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and error_lines[0].startswith("clipbatch: error: "), output
    assert f"{where}.path" in error_lines[0]
    assert wrong_secret not in output and s3server.SECRET_KEY not in output
    assert "encoder" not in output  # nothing ran


def test_missing_bucket_fails_fast(s3, tiny_model, tmp_path):
    import yaml

    spec = s3_library_spec(s3, tiny_model)
    spec["input"]["path"] = "s3://no-such-bucket/images"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc, _ = _cli(["validate", str(path)], {}, tmp_path)
    assert proc.returncode == 2 and "input.path" in proc.stderr and "no-such-bucket" in proc.stderr


def test_broken_files_on_s3_are_error_rows(s3, pets_bucket, images, tiny_model, ray_local):
    from conftest import broken_files

    good = next(images.rglob("*.jpg")).read_bytes()
    for name, data in {**broken_files(good), "empty.png": b"", "ok.jpg": good}.items():
        pets_bucket.pipe_file(f"pets/broken/{name}", data)
    opts = {"endpoint_url": s3.endpoint}
    spec = spec_dict("s3://pets/broken", tiny_model, "s3://pets/broken-out",
                     input={"storage_options": opts, "max_pixels": 10_000_000}, output={"storage_options": opts})
    summary = clipbatch.run(spec)
    assert summary.complete and summary.rows == 7 and summary.errors == 6
    rows = {r["id"]: r for r in pq.read_table("pets/broken-out", filesystem=pets_bucket).to_pylist()}
    assert rows["ok.jpg"]["error"] is None and "over input.max_pixels" in rows["bomb.png"]["error"]
    assert all(rows[n]["error"] for n in rows if n != "ok.jpg")
