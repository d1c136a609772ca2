"""The job's Ray: the cluster RAY_ADDRESS names, or a local Ray of the job's own, and what the plan needs of it.

Joining a cluster fails in seconds with one line rather than hanging: the address
is checked for an answer before ``ray.init`` (which retries an address that does
not answer for minutes), the cluster's token is found where Ray keeps it and used,
and Ray's own errors (a refused token, a version mismatch) become one line.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray._private.authentication.authentication_token_setup import \
    maybe_enable_token_auth_if_token_available as enable_token_auth_if_token_available
from ray._private.services import canonicalize_bootstrap_address  # RAY_ADDRESS=auto resolved as ray.init does
from ray._raylet import GcsClient  # one call to the cluster, to learn whether it wants a token
from ray.exceptions import AuthenticationError

from clipbatch.errors import UserError, add_secret

TOKEN_HELP = ("set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file that holds it, or put it in "
              "~/.ray/auth_token (`ray get-auth-token` on the head node prints it)")
REACH_TIMEOUT_S = 20  # how long an address that does not answer is tried before the job stops
GPU_POLL_S = 5
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"  # "Token authentication is enabled..."


class ClusterError(UserError):
    """A problem reaching or using the cluster, reported as one line like a spec error."""


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


def find_token() -> tuple[str, str] | None:
    """(token, where it was found), in Ray's own order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token. Whatever is found is masked in everything clipbatch prints."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        token, where = os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    else:
        named = os.environ.get("RAY_AUTH_TOKEN_PATH")
        path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
        if not path.is_file():
            if named:
                raise ClusterError(f"RAY_AUTH_TOKEN_PATH is {named}, which is not a file; {TOKEN_HELP}")
            return None
        token, where = path.read_text().strip(), str(path)
        if not token:
            raise ClusterError(f"the token file {path} is empty; {TOKEN_HELP}")
    add_secret(token)
    return token, where


def init_ray() -> str | None:
    """Connect once per process; returns the cluster dashboard's URL, if any.

    Without RAY_ADDRESS the job starts a local Ray of its own (``address="local"``): a plain
    ``ray.init()`` would instead join whatever /tmp/ray/ray_current_cluster names, and hang on
    the address of a head that has died. Joining a running local cluster is RAY_ADDRESS=auto.
    """
    dashboard = None
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            dashboard = join_cluster(os.environ["RAY_ADDRESS"])
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


def join_cluster(address: str) -> str | None:
    """ray.init on the cluster at address, with its token; one line instead of a hang or a traceback."""
    host_port = check_answers(address)
    if not address.startswith("ray://") and not _authenticates(host_port):  # ray:// is Ray Client's own
        found = find_token()
        if found is None:
            raise ClusterError(f"the Ray cluster at {address} requires an authentication token and none was "
                               f"found: {TOKEN_HELP}")
        # Ray's client sends the token only in token mode, which must stay off for a cluster without tokens
        # (its workers could not call back into this process); Ray's own switch also refreshes the config
        # this process read when it imported Ray.
        with _quiet(AUTH_LOGGER):
            enable_token_auth_if_token_available(warn_if_disabled=False)
        if not _authenticates(host_port):
            raise ClusterError(f"the Ray cluster at {address} refused the token from {found[1]}; check that it "
                               f"is this cluster's token ({TOKEN_HELP})")
    try:
        url = ray.init(logging_level="WARNING").dashboard_url
    except RuntimeError as exc:
        if "Version mismatch" not in str(exc):
            raise
        raise ClusterError(version_mismatch(address, str(exc))) from None
    return f"http://{url}" if url and "://" not in url else url


def _authenticates(host_port: str) -> bool:
    """Whether the cluster's GCS accepts this process as it is (with or without a token): one call, at once."""
    try:
        GcsClient(address=host_port).internal_kv_get(b"session_name", namespace=b"session", timeout=10)
    except AuthenticationError:
        return False
    return True


@contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_answers(address: str, timeout_s: float = REACH_TIMEOUT_S) -> str:
    """The cluster's host:port; stops with one line when nothing answers there within timeout_s."""
    if address.startswith("ray://"):
        host_port = address.removeprefix("ray://")
    else:
        try:
            host_port = canonicalize_bootstrap_address(address)
        except (ConnectionError, ValueError):
            host_port = None
        if host_port is None:
            raise ClusterError(f"RAY_ADDRESS is {address}, which names no running cluster; start one with "
                               "`ray start --head`, or unset RAY_ADDRESS to run on a Ray of the job's own")
    host, _, port = host_port.rpartition(":")
    deadline = time.time() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)).close()
            return host_port
        except OSError as exc:
            if time.time() >= deadline:
                raise ClusterError(
                    f"nothing answers at the Ray cluster's address {host_port} (RAY_ADDRESS={address}: "
                    f"{exc.strerror or exc}); check the address, that the head is running (`ray status` on it), "
                    "and that no firewall blocks the port") from None
            time.sleep(1.0)


def version_mismatch(address: str, message: str) -> str:
    """Ray's several-line version mismatch as one line with both versions."""
    found = re.findall(r"Ray: (\S+)\s+Python: (\S+)", message)
    if len(found) != 2:
        return f"the Ray cluster at {address} runs another version: {' '.join(message.split())}"
    (cluster_ray, cluster_py), (here_ray, here_py) = found
    return (f"the Ray cluster at {address} runs Ray {cluster_ray} on Python {cluster_py}, this machine Ray "
            f"{here_ray} on Python {here_py}; install the cluster's versions here (pip install 'ray[data]=="
            f"{cluster_ray}' in a Python {cluster_py})")


def wait_for_gpus(gpus: float, timeout_s: float) -> Cluster:
    """Wait up to timeout_s for the cluster's autoscaler to bring `gpus` GPUs; the cluster then."""
    cluster = cluster_info()
    if cluster.gpus >= gpus:
        return cluster
    print(f"clipbatch: waiting up to {timeout_s:g} s (compute.wait_for_gpus_s) for the cluster at "
          f"{cluster.address} to have a GPU node: it reports {cluster.gpus:g} GPUs and each encoder actor "
          f"asks for {gpus:g}", flush=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        time.sleep(min(GPU_POLL_S, max(0.0, deadline - time.time())))
        cluster = cluster_info()
        if cluster.gpus >= gpus:
            print(f"clipbatch: {cluster.gpus:g} GPUs now; starting", flush=True)
            return cluster
    raise ClusterError(f"no GPU node joined the cluster at {cluster.address} within {timeout_s:g} s "
                       f"(compute.wait_for_gpus_s), and each encoder actor asks for {gpus:g} GPU; add GPU "
                       "nodes (or let an autoscaler add them), or set compute.gpus_per_actor: 0 to run on CPUs")


def _no_false_cpu_alarm(record: logging.LogRecord) -> bool:
    """Drops Ray Data's "the Ray cluster currently does not have any available CPUs ... will hang"
    for the Ray a job starts for itself: nothing else runs there, and every such job ran normally."""
    return "does not have any available CPUs" not in record.getMessage()
