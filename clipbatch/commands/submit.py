"""`clipbatch submit|status|logs`: run a job spec on a Ray cluster through Ray's Jobs API.

The spec is validated here (with its --set overrides applied) and shipped in
the job's runtime_env working_dir together with this clipbatch package
(py_modules), so the cluster runs exactly the spec and the code the user ran
locally. Clusters with token authentication (Ray's default since 2.59 for
local and 2.61 for all clusters) need the token on every request; Ray's own
client only sends it when RAY_AUTH_MODE=token is set in the submitting shell,
so clipbatch finds the token where Ray keeps it and sends the header itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec
import yaml

import clipbatch
from clipbatch.errors import one_line, redact
from clipbatch.pipeline.session import TOKEN_HELP, ClusterError, find_token
from clipbatch.spec import load_spec

SPEC_NAME = "clipbatch-job.yaml"  # the spec's name inside the job's working_dir
def _auth_headers(found: tuple[str, str] | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {found[0]}"} if found else None


def dashboard_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (as Ray's job CLI)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError("no cluster given: use --address http://HEAD:8265 (the Ray dashboard's address) "
                           "or set RAY_API_SERVER_ADDRESS")
    return address


def connect(address: str | None):
    """A JobSubmissionClient for the dashboard at address, sending the token when there is one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = dashboard_address(address)
    found = find_token()
    headers = _auth_headers(found)
    # Ray lets RAY_API_SERVER_ADDRESS and RAY_ADDRESS override the address it is given; here it is given one.
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        if found is None:
            raise ClusterError(f"the Ray cluster at {address} requires an authentication token and none was "
                               f"found: {TOKEN_HELP}") from None
        if "Authentication failed" in str(exc):
            raise ClusterError(f"the Ray cluster at {address} refused the token from {found[1]}; {TOKEN_HELP}") \
                from None
        raise ClusterError(one_line(exc)) from None
    except ConnectionError:
        raise ClusterError(f"cannot reach the Ray dashboard at {address}: is the head node running, and is "
                           "this its dashboard address (port 8265 by default)?") from None
    finally:
        os.environ.update(hidden)


def _is_local_path(path: str) -> bool:
    return fsspec.core.split_protocol(path)[0] in (None, "file", "local")


def _runs_here(address: str, client) -> bool:
    """Whether every node of the cluster is this machine: a head started here, not one reached
    through an SSH tunnel or `kubectl port-forward` on localhost (its nodes have other addresses)."""
    import requests

    if not _is_this_machine(address):
        return False
    try:
        r = requests.get(f"{client.get_address()}/api/v0/nodes", headers=_auth_headers(find_token()),
                         timeout=30)
        nodes = r.json()["data"]["result"]["result"]
        return all(_is_this_machine(n["node_ip"]) for n in nodes if n.get("state") == "ALIVE")
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return True  # an older dashboard without the state API: trust the address


def _is_this_machine(address: str) -> bool:
    """Whether the head at address runs here, so that it reads the same local files as this shell."""
    host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        return False
    from ray.util import get_node_ip_address  # the address Ray itself would give a node started here

    try:
        return host == get_node_ip_address() or host in socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        return False


def place_paths(raw: dict[str, Any], remote: bool, ship: Path | None) -> dict[str, Any]:
    """The spec as the cluster must see it (input, output, the labels' files, every model's local-dir
    and checkpoint): local paths under --working-dir become paths relative to
    the job's working directory (shipped with it); other local paths become absolute for a head on this
    machine, and are an error for a remote one (it cannot read this machine's files)."""
    def place(key: str, value: str, prefix: str = "") -> str:
        path = os.path.abspath(os.path.expanduser(value))
        if ship is not None and key != "output.path" and Path(path).is_relative_to(ship):
            return prefix + Path(path).relative_to(ship).as_posix()
        if not remote:
            return prefix + path
        hint = ("results written there would stay on a cluster node; use shared storage (s3://, gs://, ...)"
                if key == "output.path" else "use shared storage (s3://, gs://, ...) or ship it with "
                "--working-dir DIR (small files only)")
        raise ClusterError(f"{key} {value!r} is a local path that the remote cluster cannot read; {hint}")

    spec = yaml.safe_load(yaml.safe_dump(raw))
    inputs = spec["input"]["path"]
    spec["input"]["path"] = [place("input.path", p) if _is_local_path(p) else p for p in inputs] \
        if isinstance(inputs, list) else place("input.path", inputs) if _is_local_path(inputs) else inputs
    if _is_local_path(spec["output"]["path"]):
        spec["output"]["path"] = place("output.path", spec["output"]["path"])
    for key in ("classes_file", "templates_file", "prompts_file"):
        if spec["labels"].get(key) and _is_local_path(spec["labels"][key]):
            spec["labels"][key] = place(f"labels.{key}", spec["labels"][key])
    models = [("model", spec["model"])] if spec.get("model") else \
        [(f"models[{i}]", m) for i, m in enumerate(spec["models"])]
    for where, model in models:
        if model["name"].startswith("local-dir:"):
            model["name"] = place(f"{where}.name", model["name"].removeprefix("local-dir:"), "local-dir:")
        if model.get("pretrained") and os.path.isfile(os.path.expanduser(model["pretrained"])):
            model["pretrained"] = place(f"{where}.pretrained", model["pretrained"])
    return spec


def _stage(spec: dict[str, Any], ship: Path | None) -> str:
    """A directory to upload as the job's working_dir: the --working-dir files and the spec."""
    if ship is not None and (ship / SPEC_NAME).exists():
        raise ClusterError(f"--working-dir {ship} already holds a {SPEC_NAME}; clipbatch writes the job's spec "
                           "under that name")
    stage = Path(tempfile.mkdtemp(prefix="clipbatch-submit-"))
    if ship is not None:
        shutil.copytree(ship, stage, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    (stage / SPEC_NAME).write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(stage)


def submit(spec_path: str, overrides: dict[str, Any], address: str | None, wait: bool,
           working_dir: str | None) -> int:
    ship = Path(working_dir).resolve() if working_dir else None
    if ship is not None and not ship.is_dir():
        raise ClusterError(f"--working-dir {working_dir} is not a directory")
    # A bad spec, or a local path that a remote cluster cannot read, fails before the cluster is contacted.
    spec = load_spec(spec_path, overrides)
    address = dashboard_address(address)
    raw = spec.model_dump(mode="json", exclude_unset=True)
    if not _is_this_machine(address):
        place_paths(raw, True, ship)
    client = connect(address)
    placed = place_paths(raw, not _runs_here(address, client), ship)
    stage = _stage(placed, ship)
    try:
        job_id = client.submit_job(
            entrypoint=f"python -m clipbatch.remote run {SPEC_NAME}",
            submission_id=f"clipbatch-{_slug(spec.name)}-{uuid.uuid4().hex[:8]}",
            runtime_env={"working_dir": stage, "py_modules": [str(Path(clipbatch.__file__).parent)]},
            metadata={"clipbatch_job": spec.name, "clipbatch_version": clipbatch.__version__})
    except RuntimeError as exc:  # the Jobs API refused it, e.g. a runtime_env upload over Ray's size limit
        raise ClusterError(f"the cluster at {address} did not accept the job: {one_line(exc)}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if not wait:
        print(job_id)
        return 0
    where = client.get_address()
    print(f"clipbatch: submitted {job_id} to {where} (dashboard: {where}/#/jobs/{job_id})", file=sys.stderr,
          flush=True)
    return follow(client, job_id)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40] or "job"


def follow(client, job_id: str) -> int:
    """Stream the job's logs until it ends; the exit code is the job's outcome."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(redact(chunk))
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nclipbatch: stopped following; {job_id} keeps running (clipbatch status {job_id}, "
              f"clipbatch logs {job_id} --follow, ray job stop {job_id})", file=sys.stderr)
        return 130
    return report(client, job_id)


def report(client, job_id: str) -> int:
    """One line with the job's state; 0 when it succeeded or is still going, 1 when it failed or was stopped."""
    info = client.get_job_info(job_id)
    state = str(info.status)
    message = redact((info.message or "").strip().splitlines()[0]) if info.message else ""
    print(f"clipbatch: {job_id} {state}{': ' + message if message else ''}", file=sys.stderr, flush=True)
    return 1 if state in ("FAILED", "STOPPED") else 0


def client_for_job(address: str | None, job_id: str):
    client = connect(address)
    try:
        client.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise ClusterError(f"no job {job_id!r} on the cluster at {client.get_address()}") from None
        raise
    return client


def print_logs(client, job_id: str) -> int:
    sys.stdout.write(redact(client.get_job_logs(job_id)))
    return 0
