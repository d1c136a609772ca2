"""`clipbatch run` joins the Ray cluster named by RAY_ADDRESS instead of starting its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import spec_dict

CLUSTER = """
import subprocess, sys, os
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
env = {**os.environ, "RAY_ADDRESS": cluster.address}
code = subprocess.call([sys.executable, "-m", "clipbatch.cli", "run", sys.argv[1]], env=env)
cluster.shutdown()
sys.exit(code)
"""


@pytest.mark.slow
def test_run_uses_cluster_from_ray_address(tmp_path, tiny_model, images):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec_dict(images, tiny_model, tmp_path / "out")))
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER)
    proc = subprocess.run([sys.executable, str(script), str(job)], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["ray"]["nodes"] == 2 and manifest["ray"]["cpus"] == 3
    assert manifest["ray"]["address"] != "local"
    assert manifest["counts"]["rows"] == 24
