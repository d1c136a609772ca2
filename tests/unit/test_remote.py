"""A submitted job on a cluster whose Python lacks clipbatch's dependencies says so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_python_without_the_dependencies_gets_one_line(tmp_path):
    """`python -S` has no site-packages: as a head started from a virtualenv whose python is not the
    one on its PATH. clipbatch itself arrives as the job's py_modules do, on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-S", "-m", "clipbatch.remote", "run", "clipbatch-job.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipbatch: error: the cluster's Python"), proc.stderr
    assert "pillow" in lines[0] and "torch" in lines[0] and "install clipbatch there" in lines[0]


def test_a_complete_python_runs_the_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clipbatch.remote", "validate", "missing.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "clipbatch: error: job spec 'missing.yaml' not found"
