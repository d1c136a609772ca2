"""The million-image rehearsal: memory, throughput, ETA, a SIGKILL and a resume, and reading the output back.

    python bench/million_corpus.py /work/rehearsal       # 1,000,000 images in 100 tars, 100,000 loose files
    python bench/million.py run /work/rehearsal --work /work/rehearsal-runs
    python bench/million.py listing --work /work/listing10m   # 10,000,000 URIs to the first batch

`run` takes `clipbatch run` as a user does (the bundled demo model, whose 64-px input makes the
model cheap, so that the pipeline is what is measured), sampling every few seconds the driver's and
each Ray worker's RSS, the object store's use and spilling, and the rows written (from the parts'
footers):
  1. the WebDataset job, SIGKILLed (its whole process group) once half its rows are written,
     then run again to the end: every input exactly once, and how long the rerun took to plan;
  2. a reference job, uninterrupted, over the shards the kill cut in two, compared row by row;
  3. the loose-file job, uninterrupted: the ETA read at 10% against the time it really took;
  4. DuckDB (count, group-by label, top-k by score) and `clipbatch search` on the million rows.
`listing` takes a file of ten million URIs (that need not exist) through listing, planning and Ray
Data up to the first batch of a do-nothing read, in a fresh process: time and the driver's peak RSS.
Each writes a JSON record under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pyarrow.parquet as pq

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross", "orange heart"]
PROGRESS = re.compile(r"clipbatch: ([\d,]+)/~?([\d,]+) images \(([\d.]+)%\).*ETA (\w+),")
MB = 1 << 20


def write_spec(work: Path, name: str, path, fmt: str = "auto") -> Path:
    spec = {"name": name, "input": {"path": path, "format": fmt}, "model": {"name": "clipbatch-demo"},
            "labels": {"classes": CLASSES, "templates": ["a photo of a {}."]},
            "output": {"path": str(work / name)}}
    job = work / f"{name}.yaml"
    job.write_text(json.dumps(spec))  # JSON is YAML
    return job


def _seconds(text: str) -> float:
    """'1h02m', '3m05s', '41s' -> seconds."""
    parts = dict((unit, int(v)) for v, unit in re.findall(r"(\d+)([hms])", text))
    return parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)


class Sampler(threading.Thread):
    """Samples a running `clipbatch run`: RSS of its driver and Ray processes, the object store, rows."""

    def __init__(self, proc: subprocess.Popen, output: Path, log: Path, interval: float = 5.0):
        super().__init__(daemon=True)
        self.proc, self.output, self.log, self.interval = proc, output, log, interval
        self.t0 = time.time()
        self.samples: list[dict] = []
        self.progress: list[dict] = []  # progress lines, with the time they appeared
        self.pids: set[int] = set()
        self._footers: dict[str, int] = {}
        self._store: subprocess.Popen | None = None
        self._store_latest: tuple[float | None, float | None] = (None, None)
        self._log_pos = 0
        self.planned_s: float | None = None  # when the 'N of M ... to do' line appeared
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sample()
            except psutil.Error:
                pass
            self.stop.wait(self.interval)

    def rows(self) -> int:
        for part in self.output.glob("part-*.parquet"):
            if part.name not in self._footers:
                self._footers[part.name] = pq.read_metadata(part).num_rows
        return sum(self._footers.values())

    def _store_stats(self, procs) -> tuple[float | None, float | None]:
        """(object store MiB used, MiB spilled so far), from a helper process that asks the cluster's GCS
        (Ray's client ends the process it is in when its cluster goes away, as the kill makes it)."""
        if self._store is None:
            try:
                gcs = next(p for p in procs if p.name() == "gcs_server")
                session = Path(next(a for a in gcs.cmdline() if a.startswith("--log_dir=")).split("=", 1)[1]).parent
                port = next(session.glob("gcs_server_port_*")).read_text().strip()
            except (StopIteration, psutil.Error, OSError):
                return None, None
            self._store = subprocess.Popen([sys.executable, __file__, "store-child", port, str(self.interval)],
                                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read_store, daemon=True).start()
        return self._store_latest

    def _read_store(self) -> None:
        for line in self._store.stdout:
            self._store_latest = tuple(json.loads(line))

    def close(self) -> None:
        if self._store is not None:
            self._store.kill()

    def sample(self) -> None:
        root = psutil.Process(self.proc.pid)
        procs = [root, *root.children(recursive=True)]
        self.pids.update(p.pid for p in procs)
        workers = {}
        for p in procs[1:]:
            try:
                if p.name().startswith("ray::") and "Agent" not in p.name():
                    workers[str(p.pid)] = round(p.memory_info().rss / MB, 1)
            except psutil.Error:
                continue
        used, spilled = self._store_stats(procs)
        now = round(time.time() - self.t0, 1)
        self.samples.append({"t": now, "rows": self.rows(), "driver_mb": round(root.memory_info().rss / MB, 1),
                             "workers_mb": workers, "store_used_mb": used, "spilled_mb": spilled})
        with open(self.log) as f:
            f.seek(self._log_pos)
            for line in f:
                if " to do; " in line and self.planned_s is None:
                    self.planned_s = now
                m = PROGRESS.search(line)
                if m:
                    self.progress.append({"t": now, "done": int(m[1].replace(",", "")),
                                          "total": int(m[2].replace(",", "")), "pct": float(m[3]),
                                          "eta_s": _seconds(m[4]) if m[4] != "?" else None})
            self._log_pos = f.tell()


def launch(job: Path, log: Path, kill_at_rows: int | None = None, interval: float = 5.0) -> dict:
    """`clipbatch run job` in its own process group, sampled; SIGKILLed at kill_at_rows rows written."""
    output = Path(json.loads(job.read_text())["output"]["path"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    began = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "clipbatch.cli", "run", str(job)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    sampler = Sampler(proc, output, log, interval)
    sampler.start()
    killed = survivors = None
    while proc.poll() is None:
        time.sleep(1)
        if kill_at_rows and sampler.samples and sampler.samples[-1]["rows"] >= kill_at_rows:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = time.time() - began
            proc.wait()
            time.sleep(2)
            survivors = [p.pid for p in map(_process, sampler.pids) if p and p.is_running()
                         and p.status() != psutil.STATUS_ZOMBIE]
            for pid in survivors:  # Ray processes outside the group: count them, then stop them
                os.kill(pid, signal.SIGKILL)
            break
    sampler.stop.set()
    sampler.join()
    sampler.close()
    seconds = time.time() - began
    text = log.read_text()
    return {"job": job.name, "returncode": proc.returncode, "seconds": round(seconds, 1),
            "killed_at_s": killed and round(killed, 1), "survivors_of_kill": survivors,
            "rows_at_end": sampler.rows(), "planned_s": sampler.planned_s, "samples": sampler.samples,
            "progress": sampler.progress, "last_lines": text.strip().splitlines()[-3:]}


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _rows_at(samples: list[dict], rows: float) -> float | None:
    """The time at which `rows` rows were written, interpolated between samples."""
    for a, b in zip(samples, samples[1:]):
        if a["rows"] <= rows <= b["rows"] and b["rows"] > a["rows"]:
            return a["t"] + (b["t"] - a["t"]) * (rows - a["rows"]) / (b["rows"] - a["rows"])
    return None


def rate_between(samples: list[dict], lo: float, hi: float) -> float | None:
    t_lo, t_hi = _rows_at(samples, lo), _rows_at(samples, hi)
    return round((hi - lo) / (t_hi - t_lo), 1) if t_lo is not None and t_hi and t_hi > t_lo else None


def memory(samples: list[dict], until_rows: float) -> dict:
    """Peak RSS of the driver and of each worker up to `until_rows` rows, and over the whole run."""
    early = [s for s in samples if s["rows"] <= until_rows]

    def peaks(group):
        workers: dict[str, float] = {}
        for s in group:
            for pid, mb in s["workers_mb"].items():
                workers[pid] = max(workers.get(pid, 0), mb)
        return max((s["driver_mb"] for s in group), default=0), workers

    driver_early, workers_early = peaks(early)
    driver_all, workers_all = peaks(samples)
    ratios = {pid: workers_all[pid] / mb for pid, mb in workers_early.items() if mb > 0}
    return {"driver_peak_mb_early": driver_early, "driver_peak_mb": driver_all,
            "driver_ratio": round(driver_all / driver_early, 3) if driver_early else None,
            "worker_peak_mb_early": max(workers_early.values(), default=0),
            "worker_peak_mb": max(workers_all.values(), default=0),
            "worst_worker_ratio": round(max(ratios.values()), 3) if ratios else None,
            "store_peak_mb": max((s["store_used_mb"] or 0 for s in samples), default=0),
            "spilled_mb": max((s["spilled_mb"] or 0 for s in samples), default=0)}


def eta_at_10(run: dict, total: int, finished_t: float | None) -> dict:
    """The first progress line at or past 10%: its ETA against the time the rows really took."""
    line = next((p for p in run["progress"] if p["pct"] >= 10 and p["eta_s"] is not None), None)
    if line is None:
        return {}
    result = {"line_t": line["t"], "pct": line["pct"], "eta_s": line["eta_s"], "estimated_total": line["total"],
              "predicted_rate": round((line["total"] - line["done"]) / max(line["eta_s"], 1), 1)}
    if finished_t is not None and finished_t > line["t"]:
        result["real_remaining_s"] = round(finished_t - line["t"], 1)
        result["eta_error"] = round(line["eta_s"] / (finished_t - line["t"]) - 1, 3)
    return result


def cut_shards(output: Path, parts: list[str], per_shard: int) -> list[str]:
    """Sources of the shards that the kill left partly written."""
    counts: dict[str, int] = {}
    for name in parts:
        for source in pq.read_table(output / name, columns=["source"])["source"].to_pylist():
            counts[source] = counts.get(source, 0) + 1
    return sorted(s for s, n in counts.items() if 0 < n < per_shard)


def compare(resumed: Path, reference: Path, sources: list[str]) -> dict:
    """The resumed output's rows of `sources` against an uninterrupted run's, row by row."""
    import duckdb
    import numpy as np
    con = duckdb.connect()
    query = ("SELECT id, label, scores, embedding FROM read_parquet('{}/part-*.parquet') "
             "WHERE source IN (SELECT unnest(?)) ORDER BY id")
    a = con.execute(query.format(resumed), [sources]).to_arrow_table()
    b = con.execute(query.format(reference), [sources]).to_arrow_table()
    same_ids = a["id"].to_pylist() == b["id"].to_pylist()
    ea = np.stack(a["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    eb = np.stack(b["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    cos = (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
    sa = np.stack(a["scores"].to_numpy(zero_copy_only=False))
    sb = np.stack(b["scores"].to_numpy(zero_copy_only=False))
    return {"rows": a.num_rows, "reference_rows": b.num_rows, "same_ids": same_ids,
            "labels_equal": int(sum(x == y for x, y in zip(a["label"].to_pylist(), b["label"].to_pylist()))),
            "min_embedding_cosine": float(cos.min()), "max_score_diff": float(np.abs(sa - sb).max())}


def exactly_once(output: Path, shards: int, per_shard: int) -> dict:
    import duckdb
    con = duckdb.connect()
    rows, distinct, errors = con.execute(
        f"SELECT count(*), count(DISTINCT id), count(error) FROM read_parquet('{output}/part-*.parquet')").fetchone()
    per_source = con.execute(f"SELECT count(*), min(n), max(n) FROM (SELECT source, count(*) n FROM "
                             f"read_parquet('{output}/part-*.parquet') GROUP BY source)").fetchone()
    return {"rows": rows, "distinct_ids": distinct, "errors": errors, "sources": per_source[0],
            "rows_per_source_min": per_source[1], "rows_per_source_max": per_source[2],
            "exactly_once": rows == distinct == shards * per_shard and per_source == (shards, per_shard, per_shard),
            "success_file": (output / "_SUCCESS").exists()}


def reading_back(output: Path) -> dict:
    """What a user does next with a million rows: DuckDB queries and `clipbatch search`, timed."""
    import duckdb
    parts = f"read_parquet('{output}/part-*.parquet')"
    queries = {"count": f"SELECT count(*) FROM {parts}",
               "group_by_label": f"SELECT label, count(*) FROM {parts} GROUP BY label",
               "top_k_by_score": f"SELECT id, score FROM {parts} WHERE label = '{CLASSES[0]}' "
                                 f"ORDER BY score DESC LIMIT 10"}
    times = {}
    for name, sql in queries.items():
        began = time.time()
        duckdb.connect().execute(sql).fetchall()
        times[f"duckdb_{name}_s"] = round(time.time() - began, 2)
    began = time.time()
    found = subprocess.run([sys.executable, "-m", "clipbatch.cli", "search", str(output), CLASSES[1], "-k", "10",
                            "--json"], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    times["search_s"] = round(time.time() - began, 2)
    times["search_results"] = len(json.loads(found.stdout)) if found.returncode == 0 else found.stderr[-300:]
    return times


def _checked(record: dict, key: str, compute) -> None:
    """record[key] = compute(), or the error it raised: one failed analysis must not lose the runs."""
    try:
        record[key] = compute()
    except Exception as exc:
        record[key] = {"failed": f"{type(exc).__name__}: {exc}"}


def rehearse(corpus: Path, work: Path, interval: float) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    tars = sorted((corpus / "shards").glob("*.tar"))
    per_shard = 10_000
    total = len(tars) * per_shard
    big = write_spec(work, "million", [str(t) for t in tars], "webdataset")
    first = launch(big, work / "million-1.log", kill_at_rows=total // 2, interval=interval)
    save("run", {"partial": "first run", "first_run": first})
    parts_at_kill = sorted(p.name for p in (work / "million").glob("part-*.parquet"))
    second = launch(big, work / "million-2.log", interval=interval)
    save("run", {"partial": "rerun", "first_run": first, "rerun": second})
    done = first["rows_at_end"]
    record: dict = {
        "images": total, "shards": len(tars),
        "first_run": {k: v for k, v in first.items() if k not in ("samples", "progress")},
        "rerun": {**{k: v for k, v in second.items() if k not in ("samples", "progress")},
                  "first_new_row_s": next((s["t"] for s in second["samples"] if s["rows"] > done), None)},
        "samples": first["samples"] + [{**s, "t": s["t"] + first["seconds"]} for s in second["samples"]],
        "progress": first["progress"] + second["progress"]}
    _checked(record, "memory_first_run_10_vs_kill", lambda: memory(first["samples"], total * 0.1))
    _checked(record, "memory_rerun_10_vs_100", lambda: memory(second["samples"], done + (total - done) * 0.1))
    _checked(record, "rates", lambda: {
        "first_run_10_20": rate_between(first["samples"], total * 0.1, total * 0.2),
        "first_run_40_49": rate_between(first["samples"], total * 0.4, total * 0.49),
        "rerun_first_10pct_of_its_rows": rate_between(second["samples"], done, done + (total - done) * 0.1),
        "rerun_60_70": rate_between(second["samples"], total * 0.6, total * 0.7),
        "last_10pct_90_100": rate_between(second["samples"], total * 0.9, total)})
    _checked(record, "eta_first_run", lambda: {**eta_at_10(first, total, None),
             "real_rate_10_to_kill": rate_between(first["samples"], total * 0.1, total * 0.49)})
    _checked(record, "exactly_once", lambda: exactly_once(work / "million", len(tars), per_shard))
    cut = cut_shards(work / "million", parts_at_kill, per_shard)[:2]
    record["cut_shards"] = cut
    _checked(record, "resumed_vs_uninterrupted",
             lambda: compare(work / "million", _reference(work, cut, interval), cut) if cut else {})
    _checked(record, "reading_back", lambda: reading_back(work / "million"))
    save("run", {"partial": "million done", **record})
    loose_n = sum(1 for _ in (corpus / "loose").rglob("*.jpg"))
    loose = launch(write_spec(work, "loose", str(corpus / "loose")), work / "loose.log", interval=interval)
    done_t = _rows_at(loose["samples"], loose_n) or (loose["samples"][-1]["t"] if loose["samples"] else None)
    record["loose"] = {**{k: v for k, v in loose.items() if k not in ("samples", "progress")}, "images": loose_n,
                       "samples": loose["samples"], "progress": loose["progress"]}
    _checked(record["loose"], "memory_10_vs_100", lambda: memory(loose["samples"], loose_n * 0.1))
    _checked(record["loose"], "rates", lambda: {
        "10_20": rate_between(loose["samples"], loose_n * 0.1, loose_n * 0.2),
        "90_100": rate_between(loose["samples"], loose_n * 0.9, loose_n)})
    _checked(record["loose"], "eta_at_10", lambda: eta_at_10(loose, loose_n, done_t))
    return record


def _reference(work: Path, sources: list[str], interval: float) -> Path:
    job = write_spec(work, "reference", sources, "webdataset")
    run = launch(job, work / "reference.log", interval=interval)
    if run["returncode"] != 0:
        sys.exit(f"reference job failed: {run['last_lines']}")
    return work / "reference"


def store_child(port: str, interval: float) -> None:
    """Prints [object store MiB used, MiB spilled] of the local cluster at port, every interval seconds."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address
    from ray._private.services import get_node_ip_address
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # as clipbatch's own cluster
    state = get_state_from_address(f"{get_node_ip_address()}:{port}")
    while True:
        stats = get_memory_info_reply(state, timeout_seconds=10).store_stats
        print(json.dumps([round(stats.object_store_bytes_used / MB, 1), round(stats.spilled_bytes_total / MB, 1)]),
              flush=True)
        time.sleep(interval)


def listing_child(uris: Path, work: Path) -> None:
    """In a fresh process: ten million URIs through listing, planning and Ray Data to a first batch."""
    import resource
    began = time.time()
    from clipbatch.output import resume
    from clipbatch.pipeline.job import build
    from clipbatch.pipeline.plan import CPU_ROWS_PER_BLOCK
    from clipbatch.pipeline.session import init_ray
    job = build({"name": "listing", "input": {"path": str(uris)}, "model": {"name": "clipbatch-demo"},
                 "labels": {"classes": CLASSES}, "output": {"path": str(work / "out"), "mode": "overwrite"}})
    listed = time.time() - began
    todo = resume.pending(job.listing, job.out, job.format)
    init_ray()
    ready = time.time() - began
    rows = job.input_rows(todo, CPU_ROWS_PER_BLOCK).map_batches(lambda batch: batch, batch_size=32)  # a do-nothing read
    del todo
    job.forget_sources()  # as Job.run does once the listing files are written
    first = next(iter(rows.iter_batches(batch_size=32)))
    first_batch = time.time() - began
    job.out.remove_listing()
    print(json.dumps({"uris": job.listing.num_rows, "listed_s": round(listed, 1), "ray_ready_s": round(ready, 1),
                      "first_batch_s": round(first_batch, 1), "first_batch_rows": len(first["id"]),
                      "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def listing(work: Path, n: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    uris = work / f"uris-{n}.txt"
    if not uris.exists():
        with open(uris, "w") as f:
            for i in range(n):
                f.write(f"s3://bucket/images/{i // 100_000:03d}/{(i // 1000) % 100:02d}/img{i:08d}.jpg\n")
    proc = subprocess.run([sys.executable, __file__, "listing-child", str(uris), str(work)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save(kind: str, record: dict) -> Path:
    record = {"bench": f"million-{kind}", "host": socket.gethostname(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{datetime.now():%Y-%m-%d}-{socket.gethostname()}-million-{kind}.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the rehearsal")
    r.add_argument("corpus", type=Path, help="made by bench/million_corpus.py")
    r.add_argument("--work", type=Path, required=True, help="outputs and logs go here")
    r.add_argument("--interval", type=float, default=3.0, help="seconds between samples")
    s = sub.add_parser("listing", help="ten million URIs to the first batch")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("-n", type=int, default=10_000_000)
    c = sub.add_parser("listing-child")
    c.add_argument("uris", type=Path)
    c.add_argument("work", type=Path)
    c = sub.add_parser("store-child")
    c.add_argument("port")
    c.add_argument("interval", type=float)
    args = p.parse_args()
    if args.command == "store-child":
        return store_child(args.port, args.interval)
    if args.command == "listing-child":
        return listing_child(args.uris, args.work)
    record = rehearse(args.corpus, args.work, args.interval) if args.command == "run" else listing(args.work, args.n)
    summary = {k: v for k, v in record.items() if k not in ("samples", "progress")}
    if "loose" in summary:
        summary["loose"] = {k: v for k, v in record["loose"].items() if k not in ("samples", "progress")}
    print(json.dumps(summary, indent=1))
    print(f"written: {save(args.command, record)}")


if __name__ == "__main__":
    main()
