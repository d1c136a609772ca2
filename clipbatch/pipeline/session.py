"""The job's Ray: the cluster RAY_ADDRESS names, or a local Ray of the job's own, and what the plan needs of it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray


@dataclass(frozen=True)
class Cluster:
    """The resources the Ray a job runs on reports, for the compute plan and the manifest."""

    address: str  # RAY_ADDRESS, or "local" for a Ray this job started
    nodes: int
    cpus: float
    gpus: float
    memory: float  # bytes

    @property
    def can_grow(self) -> bool:
        """A running cluster's autoscaler may add the nodes a job asks for; a job's own Ray cannot."""
        return self.address != "local"


def init_ray() -> str | None:
    """Connect once per process; returns the cluster dashboard's URL, if any.

    Without RAY_ADDRESS the job starts a local Ray of its own (``address="local"``): a plain
    ``ray.init()`` would instead join whatever /tmp/ray/ray_current_cluster names, and hang on
    the address of a head that has died. Joining a running local cluster is RAY_ADDRESS=auto.
    """
    dashboard = None
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            url = ray.init(logging_level="WARNING").dashboard_url
            dashboard = f"http://{url}" if url and "://" not in url else url
        else:
            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
            logging.getLogger("ray.data.dataset").addFilter(_no_false_cpu_alarm)
    # clipbatch prints its own progress line (rows/total, img/s, ETA); Ray Data's is per operator.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Its advice ("consider setting memory=...") names a Ray option a job spec has no key for.
    ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    return dashboard


def cluster_info() -> Cluster:
    resources = ray.cluster_resources()
    return Cluster(address=os.environ.get("RAY_ADDRESS") or "local",
                   nodes=max(1, sum(1 for n in ray.nodes() if n.get("Alive"))),
                   cpus=resources.get("CPU", 0), gpus=resources.get("GPU", 0), memory=resources.get("memory", 0))


def _no_false_cpu_alarm(record: logging.LogRecord) -> bool:
    """Drops Ray Data's "the Ray cluster currently does not have any available CPUs ... will hang"
    for the Ray a job starts for itself: nothing else runs there, and every such job ran normally."""
    return "does not have any available CPUs" not in record.getMessage()
