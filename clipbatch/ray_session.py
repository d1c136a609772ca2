"""The job's Ray: joining the cluster RAY_ADDRESS names or starting a local one, and what a job
needs to know about it. Free of torch and open_clip, so that `clipbatch run` can start Ray while
the driver imports the model code to check the spec (build_while_ray_starts)."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

_started_here: str | None = None  # the GCS address of the local Ray this process started
_dashboard: str | None = None


def start_ray() -> None:
    """ray.init for a job, once per process: the cluster RAY_ADDRESS names, else a local Ray.
    Call it from the main thread: Ray's processes end with the thread that started them."""
    global _started_here, _dashboard
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        url = ray.init(logging_level="WARNING").dashboard_url
        _dashboard = f"http://{url}" if url and "://" not in url else url
    else:
        ray.init(include_dashboard=False, logging_level="WARNING")
        _started_here, _dashboard = ray.get_runtime_context().gcs_address, None
        logging.getLogger("ray.data.dataset").addFilter(_no_false_cpu_alarm)


def started_here() -> bool:
    """True while this process is connected to a local Ray it started itself (not to one that
    someone started after shutting that one down, as a test session may)."""
    import ray

    return ray.is_initialized() and _started_here == ray.get_runtime_context().gcs_address


def stop_ray_started_here() -> None:
    global _started_here
    import ray

    if started_here():
        ray.shutdown()
    _started_here = None


def init_ray() -> str | None:
    """start_ray(), and Ray Data set up for a clipbatch job; returns the cluster dashboard's URL, if any."""
    import ray

    start_ray()
    # clipbatch prints its own progress line (rows/total, img/s, ETA); Ray Data's is per operator.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Its advice ("consider setting memory=...") names a Ray option a job spec has no key for; an
    # encoder actor's memory is its model's, steady, and the CPU plan sizes the actors to the node.
    ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    return _dashboard


def build_while_ray_starts(spec, overrides: dict | None = None):
    """pipeline.build(spec) in a thread while this (main) thread starts Ray. Each is mostly one
    core's work (the checks import torch and open_clip; Ray starts its processes), so on a 2-core
    machine side by side they were ready in 9.8-10.8 s against 12.8-13.6 s one after the other.
    A spec that fails its checks stops the Ray started for it, and nothing has been read or written."""
    import ray  # here first: the thread then imports Ray Data (and clipbatch) on top of it

    if ray.is_initialized():
        return _build(spec, overrides)
    with ThreadPoolExecutor(max_workers=1) as pool:
        began = time.time()
        building = pool.submit(_build, spec, overrides)
        try:
            start_ray()
            job = building.result()
            job.ray_started_at = began
            return job
        except BaseException:
            building.cancel()
            stop_ray_started_here()
            raise


def _build(spec, overrides):
    from clipbatch.pipeline import build

    return build(spec, overrides)


def ray_cluster_info() -> dict:
    """Which Ray ran the job: enough to tell a local run from a cluster run afterwards."""
    import ray

    resources = ray.cluster_resources()
    return {"address": os.environ.get("RAY_ADDRESS") or "local",
            "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
            "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0),
            "memory": resources.get("memory", 0)}


def ray_is_this_machine() -> bool:
    """True when the connected Ray is one node, the driver's own."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id()


def _no_false_cpu_alarm(record: logging.LogRecord) -> bool:
    """Drops Ray Data's "the Ray cluster currently does not have any available CPUs ... will
    hang" for the Ray a job starts for itself: nothing else runs there, and the warning appeared
    at the start of every local job, each of which then ran normally (a false alarm)."""
    return "does not have any available CPUs" not in record.getMessage()
