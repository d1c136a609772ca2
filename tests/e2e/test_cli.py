"""`clipbatch run` as a user runs it: its own Ray whatever an old Ray left behind, and a model that
cannot be loaded stopping the job in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from clipbatch.cli import main
from conftest import spec_dict


def test_a_stale_ray_address_file_does_not_stop_run(tmp_path, tiny_model, images):
    """A head that died leaves ray_current_cluster behind; without RAY_ADDRESS the job starts a Ray
    of its own instead of waiting for that address."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:59999")  # nothing listens there
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(spec_dict(images, tiny_model, tmp_path / "out")))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
        proc = subprocess.run([sys.executable, "-m", "clipbatch.cli", "run", str(job)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert "clipbatch: complete: 24 rows" in proc.stdout and (tmp_path / "out" / "_SUCCESS").is_file()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_unloadable_checkpoint_fails_in_one_line(tmp_path, capsys, tiny_model, images, ray_local):
    """A checkpoint the checks find but that cannot be loaded (here truncated) stops the job before
    any image is read: one line naming the model, exit code 2, no rows written."""
    broken = tmp_path / "broken"
    shutil.copytree(Path(tiny_model.removeprefix("local-dir:")), broken)
    weights = broken / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(images, f"local-dir:{broken}", tmp_path / "out")))
    assert main(["run", str(spec)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipbatch: error: ")]
    assert len(err) == 1 and f"model local-dir:{broken} cannot be loaded" in err[0], err
    assert not list((tmp_path / "out").glob("part-*"))
