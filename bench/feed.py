"""Feed rate: clipbatch's steady rate against what the machine's cores can decode, in both layouts.

    python bench/feed.py --images 3000          # jobs of N and 2N web-like images

With a near-free model (224-px input, a one-layer tower: it costs almost nothing, as on a GPU) the
job is fed as fast as it can be. In one run this measures:
  - per core: each decode path in one process over a sample of the mix (ms per image);
  - the bare loop: the default decode on every core (a process each), no Ray: the limit;
  - clipbatch, CPU layout (decode inside the encoder actors), default settings;
  - clipbatch, GPU node layout (decode tasks feeding an actor that holds a GPU) on a logical GPU
    (`ray start --num-gpus 1`, compute.device cpu, gpus_per_actor 1);
  - parity of a sample of the mix with open_clip's reference pipeline.
Each clipbatch figure is the rate once running, the 2N job's images over its encoder's span (first
block out to last), beside the marginal rate of 2N images over N; start-up is reported apart, with
CPU-ms per image per stage from Ray Data's stats and peak RSS. Writes bench/results/<date>-<host>-feed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
from corpus import photo  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WEB_SIZES = [(500, 375), (640, 480), (1024, 768), (375, 500), (480, 640), (800, 600)]
CFG = json.dumps({"size": 224, "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                  "resize_mode": "shortest", "fill_color": 0})


def _make_web(args) -> Path:
    """Image i of the mix: every 50th a PNG, every 10th a progressive JPEG, the rest baseline JPEGs."""
    folder, i = args
    w, h = WEB_SIZES[i % len(WEB_SIZES)]
    img = photo(i, w, h)
    sub = folder / f"{i // 1000:03d}"
    sub.mkdir(parents=True, exist_ok=True)
    if i % 50 == 7:
        path = sub / f"img{i:06d}.png"
        img.save(path)
    else:
        path = sub / f"img{i:06d}.jpg"
        img.save(path, quality=90, progressive=i % 10 == 3)
    return path


def web_corpus(folder: Path, n: int) -> list[Path]:
    with ProcessPoolExecutor() as pool:
        return list(pool.map(_make_web, [(folder, i) for i in range(n)], chunksize=64))


# --- decode paths, each bytes -> 224x224x3 uint8 pixels ----------------------------------------

def decode_pil(data: bytes):
    """The PIL path: PIL decode and PIL bicubic resize (clipbatch's default before the feed work)."""
    from clipbatch.pipeline.decode import _open, _pixels
    img, _, _ = _open(data, False, 224, None)
    return _pixels(img, CFG)


def decode_default(data: bytes):
    from clipbatch.pipeline.decode import decode_image
    return decode_image(data, CFG)[0]


def decode_draft(data: bytes):
    from clipbatch.pipeline.decode import decode_image
    return decode_image(data, CFG, jpeg_draft=True)[0]


DECODERS = {"pil": decode_pil, "default": decode_default, "draft (opt-in)": decode_draft}


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)


def _decode_files(args) -> int:
    name, paths = args
    for path in paths:
        DECODERS[name](Path(path).read_bytes())
    return len(paths)


def per_core_ms(paths: list[Path], sample: int = 600) -> dict:
    """Each decode path in one single-threaded process over the same sample (files read beforehand)."""
    _init_worker()
    datas = [p.read_bytes() for p in paths[:sample]]
    result = {}
    for name, decode in DECODERS.items():
        decode(datas[0])
        began = time.perf_counter()
        for data in datas:
            decode(data)
        result[name] = round((time.perf_counter() - began) / len(datas) * 1e3, 3)
    return result


def bare_loop(paths: list[Path], name: str) -> float:
    """img/s of one decode path on every core (a process each, files read there), no Ray."""
    cores = os.cpu_count() or 1
    chunks = [[str(p) for p in paths[i::cores * 8]] for i in range(cores * 8)]
    with ProcessPoolExecutor(cores, initializer=_init_worker) as pool:
        list(pool.map(_decode_files, [(name, chunk[:2]) for chunk in chunks[:cores]]))  # warm the workers
        began = time.perf_counter()
        done = sum(pool.map(_decode_files, [(name, chunk) for chunk in chunks]))
    return round(done / (time.perf_counter() - began), 1)


# --- clipbatch runs ----------------------------------------------------------------------------

class PeakRss(threading.Thread):
    """Peak RSS of the driver and of the largest Ray worker (any 'ray::' process) while a run lasts."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.driver, self.worker = pid, 0.0, 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.driver = max(self.driver, psutil.Process(self.pid).memory_info().rss / 2**20)
            except psutil.Error:
                pass
            for p in psutil.process_iter(["name", "memory_info"]):
                if (p.info["name"] or "").startswith("ray::") and p.info["memory_info"]:
                    self.worker = max(self.worker, p.info["memory_info"].rss / 2**20)


def run_job(job: Path, env: dict, stats: bool = False, images: int = 1) -> dict:
    began = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "clipbatch.cli", "run", str(job), *(["--stats"] if stats else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    rss = PeakRss(proc.pid)
    rss.start()
    out, _ = proc.communicate()
    rss.stop.set()
    if proc.returncode:
        sys.exit(f"clipbatch run failed:\n{out[-3000:]}")
    return {"seconds": time.time() - began, "driver_mb": round(rss.driver), "worker_mb": round(rss.worker),
            "stage_cpu_ms": stage_cpu_ms(out, images) if stats else {},
            "encoder_span_s": encoder_span_s(out) if stats else None}


def encoder_span_s(stats: str) -> float:
    """Seconds from the encoder operator's first block out to its last (Ray Data's 'produced in')."""
    return float(re.search(r"Operator \d+ [^\n]*CountingEncoder\)?: .*? blocks produced in ([\d.]+)s", stats)[1])


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def stage_cpu_ms(stats: str, images: int) -> dict:
    """Ray Data's 'Remote cpu time ... total' per operator over the job's images: CPU-ms per image."""
    result = {}
    for block in re.split(r"\nOperator \d+ ", stats)[1:]:
        name = block.split(":")[0]
        cpu = re.search(r"Remote cpu time: .*?([\d.]+)(us|ms|s) total", block)
        if cpu:
            result[name] = round(float(cpu[1]) * _UNITS[cpu[2]] / images, 3)
    return result


def steady(jobs: dict[int, Path], env: dict) -> dict:
    """The rate once running, two ways: the 2N job's images over the span of its encoder operator (first
    block out to last, from Ray Data's stats), and the marginal rate of 2N images over N."""
    (n, small), (_, large) = sorted(jobs.items())
    first = run_job(small, env)
    second = run_job(large, env, stats=True, images=2 * n)
    rate = 2 * n / second["encoder_span_s"]
    marginal = n / (second["seconds"] - first["seconds"])
    return {"steady_img_per_s": round(rate, 1), "marginal_img_per_s": round(marginal, 1),
            "start_up_s": round(second["seconds"] - second["encoder_span_s"], 1),
            "t_n_s": round(first["seconds"], 1), "t_2n_s": round(second["seconds"], 1),
            "driver_peak_mb": second["driver_mb"], "worker_peak_mb": second["worker_mb"],
            "stage_cpu_ms_per_image": second["stage_cpu_ms"]}


def write_jobs(work: Path, paths: list[Path], model: str, n: int, compute: dict) -> dict[int, Path]:
    jobs = {}
    for count in (n, 2 * n):
        listing = work / f"list-{count}.txt"
        listing.write_text("".join(f"{p}\n" for p in paths[:count]))
        spec = {"name": f"feed-{count}", "input": {"path": str(listing)}, "model": {"name": model},
                "labels": {"classes": [f"class {i}" for i in range(10)]}, "compute": compute,
                "output": {"path": str(work / f"out-{count}"), "mode": "overwrite"}}
        jobs[count] = work / f"job-{count}-{'gpu' if compute else 'cpu'}.yaml"
        jobs[count].write_text(json.dumps(spec))
    return jobs


def gpu_node_layout(jobs: dict[int, Path], env: dict) -> dict:
    """The GPU node's layout on a logical GPU: a local cluster that reports one GPU."""
    tmp = Path(tempfile.mkdtemp(prefix="feed-ray-", dir="/tmp"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "start", "--head", f"--num-cpus={os.cpu_count()}", "--num-gpus=1", f"--port={port}",
                    "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env)
    try:
        return steady(jobs, {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env)


def parity_sample(output: Path, model: str, paths: list[Path], sample: int = 100) -> dict:
    """The output's rows for a sample of the mix against open_clip's reference pipeline."""
    import duckdb
    import open_clip
    import torch
    ref_model, _, preprocess = open_clip.create_model_and_transforms(model)
    ref_model.eval()
    head = torch.from_numpy(np.load(output / "_text_head.npy"))
    chosen = {str(p): p for p in paths[:: max(1, len(paths) // sample)][:sample]}
    rows = duckdb.connect().execute(f"SELECT source, embedding, scores FROM read_parquet('{output}/part-*.parquet') "
                                    "WHERE source IN (SELECT unnest(?))", [list(chosen)]).fetchall()
    cosines, diffs = [], []
    with torch.no_grad():
        for source, embedding, scores in rows:
            emb = ref_model.encode_image(preprocess(Image.open(chosen[source])).unsqueeze(0))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            probs = (ref_model.logit_scale.exp() * emb @ head.T).softmax(-1)[0].numpy()
            ours = np.asarray(embedding, np.float32)
            cosines.append(float(ours @ emb[0].numpy() / np.linalg.norm(ours)))
            diffs.append(float(np.abs(np.asarray(scores) - probs).max()))
    return {"images": len(rows), "min_embedding_cosine": round(min(cosines), 5),
            "max_probability_diff": round(max(diffs), 5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000, help="N: the jobs have N and 2N images")
    p.add_argument("--work", type=Path, default=Path("/tmp/clipbatch-feed"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.time()
    paths = sorted((args.work / "corpus").rglob("img*.*"))
    if len(paths) < 2 * args.images:
        paths = sorted(web_corpus(args.work / "corpus", 2 * args.images))
    paths = paths[:2 * args.images]
    print(f"corpus: {len(paths)} images in {time.time() - began:.0f} s", flush=True)
    import helpers
    tower = {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16}  # near free
    model = f"local-dir:{helpers.make_tiny_model(args.work / 'model', seed=1, vision_cfg=tower)}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    record: dict = {"bench": "feed", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "host": socket.gethostname(), "cores": os.cpu_count(), "images": args.images}
    record["per_core_ms"] = per_core_ms(paths)
    per_core = record["per_core_ms"]
    record["per_core_speedup_default_over_pil"] = round(per_core["pil"] / per_core["default"], 2)
    print("per core (ms/image):", record["per_core_ms"], flush=True)
    record["bare_loop_img_per_s"] = {name: bare_loop(paths, name) for name in ("pil", "default")}
    print("bare loop, all cores (img/s):", record["bare_loop_img_per_s"], flush=True)
    cpu = steady(write_jobs(args.work, paths, model, args.images, {}), env)
    print("clipbatch, CPU layout:", cpu, flush=True)
    gpu = gpu_node_layout(write_jobs(args.work, paths, model, args.images,
                                     {"device": "cpu", "gpus_per_actor": 1}), env)
    print("clipbatch, GPU node layout (logical GPU):", gpu, flush=True)
    bare = record["bare_loop_img_per_s"]["default"]
    record["clipbatch"] = {"cpu_layout": {**cpu, "over_bare_loop": round(cpu["steady_img_per_s"] / bare, 3)},
                           "gpu_node_layout": {**gpu, "over_bare_loop": round(gpu["steady_img_per_s"] / bare, 3)}}
    record["parity"] = parity_sample(args.work / f"out-{2 * args.images}", model, paths)
    print("parity:", record["parity"], flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now(timezone.utc):%Y-%m-%d}-{socket.gethostname()}-feed.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    print(f"record: {out}")


if __name__ == "__main__":
    main()
