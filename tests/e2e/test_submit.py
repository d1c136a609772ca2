"""`clipbatch submit|status|logs`, and `clipbatch run` joining a cluster, against a real Ray head with
token authentication on.

The head is `ray start --head` with the dashboard, in its own process group, temp dir and HOME,
so that it neither reads nor writes the real ~/.ray and no other `ray.init()` on this machine
finds it; it is stopped by signalling that process group (never `ray stop`, which stops every
Ray on the machine).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from clipbatch.spec import load_spec
from clipbatch.commands.submit import ClusterError, _runs_here, connect, place_paths
from conftest import spec_dict

VENV_BIN = str(Path(sys.executable).parent)
REPO = Path(__file__).resolve().parents[2]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _base_env(home: Path) -> dict:
    """A shell without Ray's auth settings, RAY_ADDRESS or a token, with this checkout first on the path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
    return {**env, "HOME": str(home), "PATH": f"{VENV_BIN}:{env.get('PATH', '')}", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def head():
    """A token-authenticated head on loopback without GPUs; yields (dashboard URL, token, its HOME, GCS address)."""
    root = Path(tempfile.mkdtemp(prefix="cbh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    home = root / "home"
    (home / ".ray").mkdir(parents=True)
    token = secrets.token_hex(16)
    (home / ".ray" / "auth_token").write_text(token + "\n")
    gcs, dash, *others = _free_ports(7)
    # No PYTHONPATH for the head: the job must run the clipbatch that submit ships (py_modules).
    env = {**_base_env(home), "RAY_AUTH_MODE": "token", "RAY_TMPDIR": str(root / "tmp")}
    env.pop("PYTHONPATH")
    cmd = [f"{VENV_BIN}/ray", "start", "--head", "--include-dashboard=true", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
           f"--temp-dir={root / 'tmp'}", f"--ray-client-server-port={others[0]}",
           f"--dashboard-agent-listen-port={others[1]}", f"--dashboard-agent-grpc-port={others[2]}",
           f"--runtime-env-agent-port={others[3]}", f"--metrics-export-port={others[4]}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
        yield f"http://127.0.0.1:{dash}", token, home, f"127.0.0.1:{gcs}"
    finally:
        _stop_group(proc.pid)
        shutil.rmtree(root, ignore_errors=True)


def _stop_group(pgid: int) -> None:
    """SIGTERM the head's process group, give it a while, then SIGKILL what is left (a head drains
    for up to 30 s on SIGTERM; nothing here needs draining)."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def clipbatch(args: list[str], env: dict, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipbatch.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_submit_streams_logs_and_succeeds(head, tmp_path, tiny_model, images):
    """Token from ~/.ray/auth_token with RAY_AUTH_MODE unset; images shipped with --working-dir."""
    address, token, home, _ = head
    ship = tmp_path / "ship"
    shutil.copytree(images, ship / "images")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_dict("ship/images", tiny_model, tmp_path / "out")))
    proc = clipbatch(["submit", "job.yaml", "--address", address, "--working-dir", "ship"], _base_env(home),
                     tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert token not in output
    assert "clipbatch encoder on" in output and "clipbatch: complete: 24 rows" in output  # the job's own log
    assert re.search(r"clipbatch: clipbatch-test-\w+ SUCCEEDED", proc.stderr)
    assert "Ray dashboard at" in output
    assert (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.slow
def test_failing_job_status_and_logs(head, tmp_path, tiny_model, images):
    """A spec that fails on the cluster: non-zero exit with the cluster's error, in wait mode and after
    --no-wait through `status` and `logs`; the token comes from RAY_AUTH_TOKEN_PATH."""
    address, token, home, _ = head
    env = {**_base_env(tmp_path), "RAY_AUTH_TOKEN_PATH": str(home / ".ray" / "auth_token")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_dict(images, tiny_model, tmp_path / "out")))
    missing = ["--set", f"input.path={tmp_path / 'missing'}"]
    # The --no-wait job first, so that it runs while the waiting one does.
    proc = clipbatch(["submit", "job.yaml", "--address", address, "--no-wait", *missing], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip()
    assert re.fullmatch(r"clipbatch-test-\w+", job_id)

    waited = clipbatch(["submit", "job.yaml", "--address", address, *missing], env, tmp_path)
    output = waited.stdout + waited.stderr
    assert waited.returncode == 1, output[-4000:]
    assert f"clipbatch: error: input.path: {tmp_path / 'missing'} does not exist" in waited.stdout
    assert re.search(r"clipbatch-test-\w+ FAILED", waited.stderr)

    follow = clipbatch(["logs", job_id, "--address", address, "--follow"], env, tmp_path)
    assert follow.returncode == 1 and "does not exist" in follow.stdout
    status = clipbatch(["status", job_id, "--address", address], env, tmp_path)
    assert status.returncode == 1 and f"{job_id} FAILED" in status.stderr
    logs = clipbatch(["logs", job_id, "--address", address], env, tmp_path)
    assert logs.returncode == 0 and "does not exist" in logs.stdout
    unknown = clipbatch(["status", "clipbatch-no-such-job", "--address", address], env, tmp_path)
    assert unknown.returncode == 2 and "no job 'clipbatch-no-such-job'" in unknown.stderr
    for p in (proc, waited, follow, status, logs, unknown):
        assert token not in p.stdout + p.stderr


def test_a_head_started_here_reads_local_paths(head, monkeypatch):
    """A head on loopback whose nodes all have this machine's address is 'here' (one behind an SSH
    tunnel or kubectl port-forward on localhost has nodes with other addresses)."""
    address, token, _, _ = head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    assert _runs_here(address, connect(address))


def test_without_or_with_a_wrong_token_one_line(head, tmp_path, tiny_model, images):
    address, token, _, _ = head
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_dict(images, tiny_model, tmp_path / "out")))
    proc = clipbatch(["submit", "job.yaml", "--address", address], _base_env(tmp_path), tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("clipbatch: error: the Ray cluster at") and "requires an authentication token" \
        in lines[0] and "RAY_AUTH_TOKEN" in lines[0] and "~/.ray/auth_token" in lines[0]

    wrong = token[::-1]
    proc = clipbatch(["status", "anything", "--address", address], {**_base_env(tmp_path), "RAY_AUTH_TOKEN": wrong},
                     tmp_path, timeout=120)
    assert proc.returncode == 2 and "refused the token from RAY_AUTH_TOKEN" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert wrong not in proc.stdout + proc.stderr and token not in proc.stdout + proc.stderr


def test_local_paths_and_a_remote_cluster(tmp_path, tiny_model):
    """Checked before the cluster is contacted: the address is a documentation address nobody answers."""
    raw = load_spec(spec_dict(tmp_path / "imgs", tiny_model, "s3://bucket/out")).model_dump(mode="json",
                                                                                         exclude_unset=True)
    with pytest.raises(ClusterError, match=r"^input.path '.*imgs' is a local path that the remote cluster cannot "
                                           r"read; use shared storage .* or ship it with --working-dir"):
        place_paths(raw, remote=True, ship=None)
    with pytest.raises(ClusterError, match=r"^model.name '.*tiny' is a local path"):
        place_paths(raw, remote=True, ship=tmp_path)
    raw["model"]["name"] = "clipbatch-demo"  # inside the package, which travels with every job
    shipped = place_paths(raw, remote=True, ship=tmp_path)
    assert shipped["input"]["path"] == "imgs" and shipped["model"]["name"] == "clipbatch-demo"
    raw["output"]["path"] = str(tmp_path / "out")
    with pytest.raises(ClusterError, match="output.path .* would stay on a cluster node"):
        place_paths(raw, remote=True, ship=tmp_path)
    assert place_paths(raw, remote=False, ship=None)["output"]["path"] == str(tmp_path / "out")
    # An ensemble's models and the labels' files are paths too.
    raw["output"]["path"] = "s3://bucket/out"
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    ensemble = {**raw, "input": {"path": "s3://bucket/imgs"}, "labels": {"classes_file": str(tmp_path / "classes.txt")},
                "models": [{"name": "clipbatch-demo"}, {"name": tiny_model, "key": "tiny"}]}
    del ensemble["model"]
    ensemble = load_spec(ensemble).model_dump(mode="json", exclude_unset=True)
    with pytest.raises(ClusterError, match=r"^labels.classes_file '.*classes.txt' is a local path"):
        place_paths(ensemble, remote=True, ship=None)
    with pytest.raises(ClusterError, match=r"^models\[1\].name '.*tiny' is a local path"):
        place_paths(ensemble, remote=True, ship=tmp_path)
    assert place_paths(ensemble, remote=True, ship=Path(tiny_model.removeprefix("local-dir:")).parent.parent) \
        ["models"][1]["name"].startswith("local-dir:")

    (tmp_path / "imgs").mkdir()
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_dict("imgs", tiny_model, tmp_path / "out")))
    proc = clipbatch(["submit", "job.yaml", "--address", "http://198.51.100.7:8265"], _base_env(tmp_path),
                     tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "clipbatch: error: input.path 'imgs' is a local path that the remote cluster cannot read; use shared "
        "storage (s3://, gs://, ...) or ship it with --working-dir DIR (small files only)"]


def test_tokens_are_masked(tmp_path, monkeypatch):
    """A token read from a file is masked from then on, like one in the environment; so is any
    bearer header a library echoes."""
    from clipbatch.errors import redact
    from clipbatch.commands.submit import find_token

    token = "tok-" + secrets.token_hex(8)
    (tmp_path / "token").write_text(token + "\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert redact(f"failed: {token}") == f"failed: {token}"  # not known yet
    assert find_token() == (token, str(tmp_path / "token"))
    assert redact(f"failed: {token}") == "failed: ***"
    assert redact("{'Authorization': 'Bearer abc.def-123'}") == "{'Authorization': 'Bearer ***'}"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH is .*missing, which is not a file"):
        find_token()


def run_on(tmp_path, env: dict, *sets: str, images=None, tiny_model=None) -> tuple[subprocess.CompletedProcess, float]:
    """`clipbatch run` of a small job as a user runs it, in a shell of its own; (process, seconds)."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec_dict(images, tiny_model, tmp_path / "out")))
    began = time.time()
    proc = subprocess.run([sys.executable, "-m", "clipbatch.cli", "run", str(job), *sets], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    return proc, time.time() - began


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_run_joins_a_token_cluster_with_the_token_in_home(head, tmp_path, images, tiny_model):
    """RAY_ADDRESS names a head with token authentication, the token is only in ~/.ray/auth_token and
    RAY_AUTH_MODE is unset: the job runs there, and the token appears nowhere it writes."""
    _, token, home, gcs = head
    proc, _ = run_on(tmp_path, {**_base_env(home), "RAY_ADDRESS": gcs}, images=images, tiny_model=tiny_model)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "clipbatch: complete: 24 rows" in proc.stdout
    manifest = (tmp_path / "out" / "_manifest.json").read_text()
    assert token not in proc.stdout + proc.stderr + manifest and gcs in manifest


def test_run_without_the_token_says_so_in_one_line(head, tmp_path, images, tiny_model):
    _, _, _, gcs = head
    empty = tmp_path / "home"
    empty.mkdir()
    proc, seconds = run_on(tmp_path, {**_base_env(empty), "RAY_ADDRESS": gcs}, images=images, tiny_model=tiny_model)
    assert proc.returncode == 2 and seconds < 60, (seconds, proc.stderr[-3000:])
    assert last_line(proc) == (f"clipbatch: error: the Ray cluster at {gcs} requires an authentication token and "
                               "none was found: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file that holds it, "
                               "or put it in ~/.ray/auth_token (`ray get-auth-token` on the head node prints it)")
    assert "Traceback" not in proc.stderr
    proc, _ = run_on(tmp_path, {**_base_env(empty), "RAY_ADDRESS": gcs, "RAY_AUTH_TOKEN": "not-this-clusters"},
                     images=images, tiny_model=tiny_model)
    assert proc.returncode == 2 and "refused the token from RAY_AUTH_TOKEN" in last_line(proc), proc.stderr[-3000:]
    assert "not-this-clusters" not in proc.stderr


def test_run_waits_a_bounded_time_for_gpus_the_cluster_lacks(head, tmp_path, images, tiny_model):
    _, _, home, gcs = head
    proc, seconds = run_on(tmp_path, {**_base_env(home), "RAY_ADDRESS": gcs}, "--set", "compute.gpus_per_actor=1",
                           "--set", "compute.wait_for_gpus_s=5", images=images, tiny_model=tiny_model)
    assert proc.returncode == 2 and 5 <= seconds < 60, (seconds, proc.stderr[-3000:])
    assert f"waiting up to 5 s (compute.wait_for_gpus_s) for the cluster at {gcs}" in proc.stdout
    assert last_line(proc).startswith(f"clipbatch: error: no GPU node joined the cluster at {gcs} within 5 s")
    assert not list((tmp_path / "out").glob("part-*"))


def test_run_on_an_address_where_nothing_answers_stops_in_one_line(tmp_path, images, tiny_model):
    dead = f"127.0.0.1:{_free_ports(1)[0]}"
    proc, seconds = run_on(tmp_path, {**_base_env(tmp_path), "RAY_ADDRESS": dead}, images=images,
                           tiny_model=tiny_model)
    assert proc.returncode == 2 and seconds < 60, (seconds, proc.stderr[-3000:])
    line = last_line(proc)
    assert line.startswith("clipbatch: error: nothing answers at the Ray cluster's address") and dead in line
    assert "ray status" in line and "Traceback" not in proc.stderr
