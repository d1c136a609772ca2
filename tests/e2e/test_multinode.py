"""A real multi-node Ray (ray.cluster_utils.Cluster): a CPU head and two worker nodes with one
logical GPU and two CPUs each, running one job whose encoder pool autoscales from 1 to 2 actors.
Part-way through, once both GPU nodes run an encoder, one of those nodes is killed (every
process, SIGKILL) and a fresh GPU node joins, as a cluster autoscaler would replace it. Then a
second job on the same logical GPUs, with `device: auto`, needs CUDA and must fail loudly.

Checked: encoder actors only on GPU nodes, and on both; decode tasks ask for CPU only; the job
completes with every input exactly once; the results equal a single-node run; an encoder that
would need CUDA where there is none fails the job with a clear error and writes no _SUCCESS.

The cluster runs in its own subprocess with its own RAY_TMPDIR, so that no other `ray.init()`
on this machine finds it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import helpers
from conftest import spec_dict

N_IMAGES = 2000

SCRIPT = r"""
import json, socket, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks
import clipbatch

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

spec, on_cuda = json.loads(sys.argv[1]), json.loads(sys.argv[2])
# The dashboard (for the state API) on free ports: the defaults may belong to another Ray here.
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})
ray.init(address=cluster.address, logging_level="WARNING")  # before the workers: the driver is on the head
gpu_nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ENCODER = "MapWorker(MapBatches(CountingEncoder))"
out = Path(spec["output"]["path"])
killed, finished = {}, {}

def run_job():
    try:
        finished["summary"] = clipbatch.run(spec)
    except BaseException as exc:
        finished["error"] = exc

# The job runs in a thread; this main thread replaces the node, since Cluster.add_node sets signal
# handlers, which only the main thread may.
job = threading.Thread(target=run_job)
job.start()
while job.is_alive():  # once both GPU nodes run an encoder actor...
    alive = {a.node_id for a in list_actors(filters=[("class_name", "=", ENCODER), ("state", "=", "ALIVE")])}
    if len(alive) == 2:
        break
    time.sleep(0.5)
if job.is_alive():  # ...SIGKILL every process of one of them, then add a fresh GPU node as an autoscaler would
    killed["both_alive"] = sorted(alive)
    killed["parts_before"] = len(list(out.glob("part-*.parquet")))
    victim = gpu_nodes[0]
    cluster.remove_node(victim, allow_graceful=False)
    killed["node"] = victim.node_id
    gpu_nodes.append(cluster.add_node(num_cpus=2, num_gpus=1))
job.join()
if "error" in finished:
    raise finished["error"]
summary = finished["summary"]
encoders = [a.node_id for a in list_actors(filters=[("class_name", "=", ENCODER)], detail=True, limit=1000)]
decode = [(t.node_id, t.required_resources) for t in list_tasks(
    filters=[("name", "=", "MapBatches(read_and_decode)")], detail=True, limit=10000)]
deadline = time.time() + 60  # the GCS marks the killed node dead once its health checks fail
while time.time() < deadline and killed.get("node") in {n["NodeID"] for n in ray.nodes() if n["Alive"]}:
    time.sleep(0.5)
alive_nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
try:  # device auto on logical GPUs: the encoders would need CUDA, which this machine has not
    clipbatch.run(on_cuda)
    cuda_job = "completed"
except Exception as exc:
    cuda_job = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps({
    "rows": summary.rows, "complete": summary.complete, "device": summary.device,
    "head": cluster.head_node.node_id, "gpu_nodes": [n.node_id for n in gpu_nodes], "alive_nodes": alive_nodes,
    "encoder_nodes": encoders, "decode": decode, "killed": killed, "cuda_job": cuda_job}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    """About 6 ms per image on one core: enough that the job outlasts a second actor's start-up."""
    vision = {"image_size": 224, "layers": 4, "width": 128, "patch_size": 16, "head_width": 32}
    return "local-dir:" + str(helpers.make_tiny_model(tmp_path_factory.mktemp("models") / "slow", seed=2,
                                                      vision_cfg=vision))


@pytest.fixture(scope="module")
def small_images(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, slow_model, small_images):
    tmp = tmp_path_factory.mktemp("multinode")
    spec = spec_dict(small_images, slow_model, tmp / "out", output={"rows_per_part": 64},
                     compute={"device": "cpu", "gpus_per_actor": 1, "actors": [1, 2], "batch_size": 8})
    on_cuda = spec_dict(small_images, slow_model, tmp / "cuda-out")  # device auto -> cuda on the logical GPUs
    on_cuda["input"]["path"] = [str(p) for p in sorted(small_images.iterdir())[:24]]
    script = tmp / "cluster.py"
    script.write_text(SCRIPT)
    ray_tmp = tempfile.mkdtemp(prefix="cbm", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        proc = subprocess.run([sys.executable, str(script), json.dumps(spec), json.dumps(on_cuda)],
                              capture_output=True, text=True, timeout=480, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0]), output, tmp / "out"


@pytest.mark.slow
def test_encoders_on_gpu_nodes_pool_grows_decode_on_cpu(cluster_run):
    result, output, _ = cluster_run
    gpu_nodes = set(result["gpu_nodes"])
    # Both original GPU nodes ran an encoder at the same time: the pool grew from 1 to 2.
    assert set(result["killed"]["both_alive"]) == set(result["gpu_nodes"][:2]), result
    # Every encoder that was placed ran on a GPU node (the head has none), and said where at start-up.
    placed = {n for n in result["encoder_nodes"] if n}
    assert placed and placed <= gpu_nodes, result
    started = set(re.findall(r"clipbatch encoder on .* \(Ray node (\w+)\)", output))
    assert {n[:12] for n in result["gpu_nodes"][:2]} <= started, output[-3000:]
    # Decode tasks ask for CPU only; Ray prefers CPU-only nodes for them, and the head decoded.
    assert result["decode"] and all(r.get("CPU") and not r.get("GPU") for _, r in result["decode"]), result
    assert result["head"] in {node for node, _ in result["decode"]}, result


@pytest.mark.slow
def test_losing_an_encoder_node_part_way_loses_and_duplicates_nothing(cluster_run, small_images):
    result, output, out = cluster_run
    killed = result["killed"]
    assert killed.get("node") == result["gpu_nodes"][0], result  # it ran an encoder (see both_alive)
    assert result["complete"] and result["rows"] == N_IMAGES, output[-4000:]
    ids = pq.read_table(out, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == N_IMAGES  # every input exactly once
    assert set(ids) == {p.name for p in small_images.iterdir()}
    assert killed["parts_before"] < len(list(out.glob("part-*.parquet")))  # it was part-way
    assert (out / "_SUCCESS").exists()
    # The replacement joined: the head, the surviving GPU node and the new one are alive.
    assert len(result["gpu_nodes"]) == 3 and set(result["alive_nodes"]) == {result["head"], *result["gpu_nodes"][1:]}
    assert json.loads((out / "_manifest.json").read_text())["compute"]["gpus_per_actor"] == 1.0


@pytest.mark.slow
def test_an_encoder_that_needs_cuda_fails_loudly_on_logical_gpus(cluster_run):
    """`device: auto` on a GPU node plans CUDA; on a logical GPU (no CUDA here) the job fails with
    a clear error instead of quietly computing elsewhere, and leaves no _SUCCESS."""
    result, output, out = cluster_run
    assert "finds no CUDA device" in result["cuda_job"], result["cuda_job"]
    assert not (out.parent / "cuda-out" / "_SUCCESS").exists()


@pytest.mark.slow
def test_results_equal_a_single_node_run(cluster_run, slow_model, small_images, tmp_path, ray_local):
    import clipbatch

    _, _, out = cluster_run
    sample = sorted(small_images.iterdir())[::10]  # every 10th image: the same ids, a tenth of the time
    spec = spec_dict(small_images, slow_model, tmp_path / "single", compute={"device": "cpu", "batch_size": 32})
    spec["input"]["path"] = [str(p) for p in sample]
    reference = clipbatch.run(spec)
    assert reference.complete and reference.rows == len(sample)
    single = pq.read_table(tmp_path / "single").sort_by("id")
    multi = pq.read_table(out).sort_by("id")
    multi = multi.filter(pc.is_in(multi["id"], value_set=single["id"]))
    assert multi["id"].to_pylist() == single["id"].to_pylist() == [p.name for p in sample]
    assert multi["label"].to_pylist() == single["label"].to_pylist()
    assert np.allclose(np.stack(multi["scores"].to_numpy(zero_copy_only=False)),
                       np.stack(single["scores"].to_numpy(zero_copy_only=False)), atol=1e-5)
    assert np.allclose(np.stack(multi["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32),
                       np.stack(single["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32), atol=2e-3)
