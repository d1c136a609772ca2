"""Throughput harness: clipbatch against the loops a user would write, measured in the same run.

    python bench/throughput.py                  # 2000 JPEGs 640x480, ViT-B-32, modes a b c d
    python bench/throughput.py --smoke          # tiny corpus and model: for the tests
    python bench/throughput.py --scaling        # clipbatch on the 1x and 10x corpus: time and peak RSS
    python bench/throughput.py --listing 1000000  # plan a job over a file of 1M URIs

(a) the seeds' per-image loop: open, preprocess and encode one image at a time (start-up excluded)
(b) a tuned single-process loop: DataLoader workers decode and preprocess, the model runs batched,
    Parquet out; timed like (d), as a fresh process from launch to exit (Python, torch and
    open_clip imports and model load included), and also inside this process (imports excluded)
(c) the model's pure batched forward rate on random tensors (the ceiling), one process with all threads
(c1) on CPU: one single-threaded forward process per core at once, summed (the capacity clipbatch's CPU lanes use)
(d) `clipbatch run` in a fresh process with default compute settings (Ray start-up and model load
    included)
(f) the floor under (d): a fresh process that runs the same rows through a Ray Data job of (d)'s shape
    that does nothing (Ray start, one actor passing batches through, Parquet, exit), and a fresh
    process that only loads the model. With them it prints the rate a job of this design can be
    expected to reach here (that floor, plus the images at (c1)'s rate) and how far (d) was from it

Without --pretrained the model's seeded random weights are saved once as a local-dir checkpoint in
the workdir, and every mode loads them from there, as a real job loads its weights.

Prints img/s for each, the ratios d/a, d/b and d/c, peak RSS of the clipbatch driver and of its
Ray workers, and one JSON record at the end. Machines here are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from corpus import make_corpus  # noqa: E402

CLASSES = [f"class {i}" for i in range(100)]


DEVICE = "cpu"  # --device cuda runs the loops' model on the GPU (fp16), as clipbatch does there


def load(model: str, pretrained: str | None):
    import open_clip
    import torch

    from clipbatch.model.load import resolve_model_name

    torch.manual_seed(0)
    model = resolve_model_name(model)
    m, _, preprocess = open_clip.create_model_and_transforms(
        model, pretrained=pretrained, device=DEVICE, precision="fp16" if DEVICE == "cuda" else "fp32")
    m.eval()
    tokenizer = open_clip.get_tokenizer(model)
    with torch.no_grad():
        head = m.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSES]).to(DEVICE), normalize=True)
    return m, preprocess, head


def random_weights_checkpoint(model: str, work: Path) -> str:
    """A built-in model's seeded random weights, saved once as a `local-dir:` checkpoint in the workdir.

    Why: a real job loads its weights from a checkpoint, and every mode here then loads them the way
    open_clip's factory does. Built without one, each process would initialize them randomly, work
    that no real job does (clipbatch skips that init when a checkpoint overwrites it)."""
    from clipbatch.model.load import resolve_model_name, save_local_dir

    if resolve_model_name(model).startswith(("local-dir:", "hf-hub:")):  # clipbatch-demo is a local-dir
        return model
    folder = work / f"weights-{model.replace('/', '-')}"
    if not (folder / "open_clip_model.safetensors").is_file():
        import open_clip
        import torch

        torch.manual_seed(0)
        built = open_clip.create_model(model)
        save_local_dir(built, open_clip.get_model_config(model), folder, open_clip.get_model_preprocess_cfg(built))
    return f"local-dir:{folder}"


def _input(x):
    return x.to(DEVICE, non_blocking=True).half() if DEVICE == "cuda" else x


def per_image_loop(paths, model, pretrained) -> float:
    """(a) The seeds' style: one image at a time."""
    import torch
    from PIL import Image

    m, preprocess, head = load(model, pretrained)
    started = time.time()
    with torch.no_grad():
        for path in paths:
            x = _input(preprocess(Image.open(path)).unsqueeze(0))
            emb = m.encode_image(x, normalize=True)
            (100.0 * emb @ head.T).softmax(-1)
    return len(paths) / (time.time() - started)


class _Images:
    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        return self.preprocess(Image.open(self.paths[i]))


def dataloader_loop(paths, model, pretrained, out: Path, batch_size=32, workers=2) -> float:
    """(b) A tuned loop: DataLoader workers preprocess, batched model, Parquet out; start-up included."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    started = time.time()
    m, preprocess, head = load(model, pretrained)
    loader = torch.utils.data.DataLoader(_Images(paths, preprocess), batch_size=batch_size,
                                         num_workers=workers, persistent_workers=False,
                                         pin_memory=DEVICE == "cuda")
    embs, probs = [], []
    with torch.no_grad():
        for x in loader:
            emb = m.encode_image(_input(x), normalize=True)
            embs.append(emb.half().cpu().numpy())
            probs.append((m.logit_scale.exp() * emb @ head.T).float().softmax(-1).cpu().numpy())
    emb, prob = np.concatenate(embs), np.concatenate(probs)
    pq.write_table(pa.table({
        "id": [str(p) for p in paths],
        "scores": pa.FixedSizeListArray.from_arrays(pa.array(prob.reshape(-1)), prob.shape[1]),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])}), out)
    return len(paths) / (time.time() - started)


def dataloader_loop_process(paths, args, out: Path, batch_size: int, workers: int) -> float:
    """(b) as a user runs it: a fresh Python process, timed from launch to exit like (d)."""
    code = ("import sys, pathlib; sys.path.insert(0, sys.argv[1]); import throughput as t; "
            "t.DEVICE = sys.argv[2]; paths = pathlib.Path(sys.argv[3]).read_text().split(chr(10)); "
            "t.dataloader_loop(paths, sys.argv[4], sys.argv[5] or None, pathlib.Path(sys.argv[6]), "
            "int(sys.argv[7]), int(sys.argv[8]))")
    listing = out.parent / "loop-paths.txt"
    listing.write_text("\n".join(str(p) for p in paths))
    started = time.time()
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), DEVICE, str(listing), args.model,
                    args.pretrained or "", str(out), str(batch_size), str(workers)], check=True)
    return len(paths) / (time.time() - started)


def _model_and_random_batch(model, pretrained, batch_size: int):
    """The model and one batch of random images of its input size, on DEVICE."""
    import torch

    m, _, _ = load(model, pretrained)
    size = m.visual.image_size
    size = size if isinstance(size, int) else size[0]
    return m, _input(torch.randn(batch_size, 3, size, size))


def forward_ceiling(model, pretrained, batch_size=32, batches=8) -> float:
    """(c) Pure batched forward on random tensors, fp32."""
    import torch

    m, x = _model_and_random_batch(model, pretrained, batch_size)
    with torch.no_grad():
        m.encode_image(x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        started = time.time()
        for _ in range(batches):
            m.encode_image(x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    return batch_size * batches / (time.time() - started)


def forward_worker(model, pretrained, batch_size: int, seconds: float) -> float:
    """One single-threaded forward loop timed over the same wall-clock window as its siblings':
    says "ready" once warm, then reads the window's start time from its parent."""
    import torch

    torch.set_num_threads(1)
    m, x = _model_and_random_batch(model, pretrained, batch_size)
    with torch.no_grad():
        m.encode_image(x)
        print("ready", flush=True)
        start_at = float(sys.stdin.readline())
        time.sleep(max(0.0, start_at - time.time()))
        started, done = time.time(), 0
        while time.time() - started < seconds:
            m.encode_image(x)
            done += batch_size
    return done / (time.time() - started)


def _model_argv(args) -> list[str]:
    """The model options for a worker process of this script."""
    return ["--model", args.model, *(["--pretrained", args.pretrained] if args.pretrained else [])]


def forward_per_core(args, batch_size: int) -> float:
    """(c1) The machine's forward capacity as clipbatch's CPU plan uses it (one single-threaded
    forward per core): one such process per core, all timed over the same window; their rates summed."""
    cores = os.cpu_count() or 1
    seconds = 3.0 if args.smoke else 30.0
    procs = [subprocess.Popen([sys.executable, __file__, "--forward-worker", str(seconds), *_model_argv(args),
                               "--batch", str(batch_size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(cores)]
    for p in procs:  # the window opens once every process has imported torch and warmed its model up
        while p.stdout.readline().strip() != "ready":
            if p.poll() is not None:
                raise RuntimeError(f"a (c1) forward process exited with {p.returncode}")
    start_at = time.time() + 0.5
    return sum(float(p.communicate(f"{start_at}\n")[0].split()[-1]) for p in procs)


class _PassThrough:
    """(f)'s encoder: no model, no torch; what is left is Ray's own cost of running the job."""

    def __call__(self, batch):
        return batch


def floor_worker(n: int, block_rows: int, batch_size: int, rows_per_part: int, out: Path) -> None:
    """(f) The job (d) runs, less everything clipbatch and the model do: n listing rows in (d)'s blocks
    and batches through one pass-through actor into Parquet parts of (d)'s default size (one write
    task per part, as (d)'s sink has; a file per block would add a write task per block)."""
    import pyarrow as pa
    import ray

    ray.init(include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    blocks = [pa.table({"id": [f"img{i:08d}" for i in range(start, min(n, start + block_rows))]})
              for start in range(0, n, block_rows)]
    (ray.data.from_blocks(blocks)
     .map_batches(_PassThrough, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=1))
     .write_parquet(str(out), min_rows_per_file=rows_per_part))


def model_start_worker(model: str, pretrained: str | None) -> None:
    """(f) What an encoder process does before its first batch besides Ray: torch, open_clip, the model."""
    from clipbatch.model.load import load_model

    load_model(model, pretrained, device=DEVICE)


def _timed_process(*args: str) -> float:
    """Launch to exit of `python throughput.py ARGS` (a fresh process, as (d) is timed)."""
    started = time.time()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ""})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.time() - started


def floor(args, n: int, batch_size: int, work: Path) -> dict:
    """(f) Ray's floor for n rows in (d)'s blocks and batches, and the model's start, each in a fresh process."""
    from clipbatch.pipeline.plan import CPU_ROWS_PER_BLOCK
    from clipbatch.spec import OutputSpec

    block_rows = CPU_ROWS_PER_BLOCK
    rows_per_part = OutputSpec.model_fields["rows_per_part"].default  # (d) runs with the default
    ray_s = _timed_process("--floor-worker", str(n), "--block-rows", str(block_rows), "--batch", str(batch_size),
                           "--rows-per-part", str(rows_per_part),
                           "--workdir", str(work / "floor-out"))
    model_s = _timed_process("--model-start-worker", *_model_argv(args), "--device", DEVICE)
    return {"ray_job_s": round(ray_s, 2), "model_start_s": round(model_s, 2), "floor_s": round(ray_s + model_s, 2)}


class RssSampler:
    """Peak RSS of a process and, separately, of the largest Ray worker, sampled every 0.2 s."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.driver_peak = 0
        self.worker_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        import psutil

        while not self._stop.wait(0.2):
            try:
                self.driver_peak = max(self.driver_peak, self.root.memory_info().rss)
            except psutil.Error:
                pass
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    cmd = " ".join(proc.info["cmdline"] or [])
                    if "ray::" in cmd or "default_worker.py" in cmd:
                        self.worker_peak = max(self.worker_peak, proc.memory_info().rss)
                except psutil.Error:
                    pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class GpuSampler:
    """GPU utilization (%) from nvidia-smi every 200 ms, where there is one."""

    def __init__(self):
        import shutil

        self.cmd = shutil.which("nvidia-smi")
        self.samples: list[int] = []

    def __enter__(self):
        if self.cmd:
            self.proc = subprocess.Popen([self.cmd, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line.strip()))

    def __exit__(self, *exc):
        if self.cmd:
            self.proc.terminate()
            self.proc.wait()

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        busy = [v for v in self.samples if v > 0]
        return {"mean_util_pct": round(sum(self.samples) / len(self.samples), 1),
                "mean_util_while_busy_pct": round(sum(busy) / len(busy), 1) if busy else 0.0,
                "peak_util_pct": max(self.samples)}


def clipbatch_run(images: Path, model, pretrained, out: Path, extra_env=None, overrides=()) -> dict:
    """(d) `clipbatch run` in a fresh process, default compute settings."""
    import yaml

    spec = {"name": "bench", "input": {"path": str(images)},
            "model": {"name": model, **({"pretrained": pretrained} if pretrained else {})},
            "labels": {"classes": CLASSES, "templates": ["a photo of a {}."]},
            "output": {"path": str(out), "mode": "overwrite"}}
    job = out.parent / f"{out.name}.yaml"
    job.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ADDRESS": "", **(extra_env or {})}
    started = time.time()
    sets = [arg for o in overrides for arg in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "clipbatch.cli", "run", str(job), *sets], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with RssSampler(proc.pid) as rss, GpuSampler() as gpu:
        log, _ = proc.communicate()
    seconds = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"clipbatch run failed:\n{log[-3000:]}")
    manifest = json.loads((out / "_manifest.json").read_text())
    return {"seconds": round(seconds, 2), "rows": manifest["counts"]["rows"],
            "img_per_s": manifest["counts"]["rows"] / seconds, "timings": manifest["timings"],
            "driver_peak_rss_mb": round(rss.driver_peak / 2**20), "worker_peak_rss_mb": round(rss.worker_peak / 2**20),
            "gpu": gpu.summary(), "device": manifest["device"], "batch_size": manifest["compute"]["batch_size"]}


def _corpus(folder: Path, n: int, size) -> list[Path]:
    """The corpus, made once per workdir (image i never changes, so a rerun can reuse it)."""
    existing = sorted(folder.rglob("*.jpg")) if folder.exists() else []
    return existing[:n] if len(existing) >= n else make_corpus(folder, n, [tuple(size)])


RATES = {"a_per_image": "d/a", "b_dataloader": "d/b", "c_forward": "d/c", "b_dataloader_in_process": "d/b_in_process",
         "c1_forward_per_core": "d/c1"}


def compare(args, work: Path) -> dict:
    """Every mode, args.repeat times in turn; rates and ratios are the medians over the rounds."""
    import statistics

    paths = _corpus(work / f"images-{args.n}-{args.size[0]}x{args.size[1]}", args.n, args.size)
    print(f"corpus: {len(paths)} JPEGs {args.size[0]}x{args.size[1]}", flush=True)
    rounds = []
    for i in range(args.repeat):
        if args.repeat > 1:
            print(f"round {i + 1} of {args.repeat}" + (" (modes in reverse order)" if i % 2 else ""), flush=True)
        rounds.append(one_round(args, paths, work, round_index=i))
    record = {"n": len(paths), "model": args.model, "size": args.size, "device": DEVICE, "ratios": {},
              **({"rounds": rounds} if args.repeat > 1 else {})}
    for key in RATES:
        if key in rounds[0]:
            record[key] = statistics.median(r[key] for r in rounds)
    if "d_clipbatch" in rounds[0]:
        rate = statistics.median(r["d_clipbatch"]["img_per_s"] for r in rounds)
        nearest = min((r["d_clipbatch"] for r in rounds), key=lambda d: abs(d["img_per_s"] - rate))
        record["d_clipbatch"] = {**nearest, "img_per_s": rate}
        floors = [r["f_floor"] for r in rounds if "f_floor" in r]
        ceiling = record.get("c1_forward_per_core") or record.get("c_forward")
        if floors and ceiling:
            record["f_floor"] = floors
            record["floor_s"] = statistics.median(f["floor_s"] for f in floors)
            best = len(paths) / (record["floor_s"] + len(paths) / ceiling)
            record["best_d_img_per_s"] = best
            print(f"(f) floor {record['floor_s']:.1f} s plus {len(paths)} images at {ceiling:.2f} img/s "
                  f"(the forward alone, no decoding): {best:.2f} img/s"
                  + (f" = {best / record['c_forward']:.2f} of (c)" if "c_forward" in record else "")
                  + f", what a job of this design can be expected to reach here; (d) took "
                  f"{nearest['seconds'] - len(paths) / ceiling - record['floor_s']:+.1f} s against it (an estimate: "
                  "the floor's two processes are as noisy as the rest)",
                  flush=True)
        for key, name in RATES.items():
            if key in record:
                record["ratios"][name] = rate / record[key]
        if args.repeat > 1:
            print("medians over the rounds: " + ", ".join(f"{RATES[k][2:]} {record[k]:.2f}" for k in RATES
                                                           if k in record) + f", d {rate:.2f} img/s", flush=True)
        print("ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in record["ratios"].items()), flush=True)
    return record


def round_order(modes: str, round_index: int) -> list[str]:
    """The order of the modes in a round: d c b f a, every other round the other way round, so that
    over two rounds a steady drift of the machine's speed (here up to 30% within an hour) cancels."""
    order = [m for m in "dcbfa" if m in modes]
    return order[::-1] if round_index % 2 else order


def one_round(args, paths: list[Path], work: Path, round_index: int = 0) -> dict:
    record = {}
    batch = 32 if DEVICE == "cpu" else 256

    def d():
        record["d_clipbatch"] = r = clipbatch_run(paths[0].parent.parent, args.model, args.pretrained, work / "out",
                                                  overrides=args.set)
        print(f"(d) clipbatch run          {r['img_per_s']:7.2f} img/s  ({r['seconds']} s, {r['device']}, batch "
              f"{r['batch_size']}, driver peak {r['driver_peak_rss_mb']} MB, largest worker "
              f"{r['worker_peak_rss_mb']} MB, GPU {r['gpu']}, timings {r['timings']})", flush=True)

    def c():
        record["c_forward"] = forward_ceiling(args.model, args.pretrained, batch_size=batch,
                                              batches=8 if DEVICE == "cpu" else 40)
        print(f"(c) pure forward (ceiling) {record['c_forward']:7.2f} img/s (batch {batch})", flush=True)
        if DEVICE == "cpu" and (os.cpu_count() or 1) > 1:
            record["c1_forward_per_core"] = forward_per_core(args, batch)
            print(f"(c1) forward, 1 thread per core {record['c1_forward_per_core']:6.2f} img/s ({os.cpu_count()} "
                  "single-threaded processes at once: the cores clipbatch's CPU lanes use)", flush=True)

    def b():
        loop = dict(batch_size=batch, workers=min(16, os.cpu_count() or 2))
        record["b_dataloader"] = dataloader_loop_process(paths, args, work / "loop.parquet", **loop)
        print(f"(b) tuned DataLoader loop  {record['b_dataloader']:7.2f} img/s (a fresh process, as (d))", flush=True)
        record["b_dataloader_in_process"] = dataloader_loop(paths, args.model, args.pretrained,
                                                            work / "loop.parquet", **loop)
        print(f"    the same loop in-process {record['b_dataloader_in_process']:5.2f} img/s (imports excluded)",
              flush=True)

    def f():
        record["f_floor"] = r = floor(args, len(paths), batch, work)
        print(f"(f) floor: a do-nothing Ray Data job of {len(paths)} rows {r['ray_job_s']} s, the model's start "
              f"{r['model_start_s']} s (fresh processes, launch to exit)", flush=True)

    def a():
        a_paths = paths[: max(32, len(paths) // 4)]
        record["a_per_image"] = per_image_loop(a_paths, args.model, args.pretrained)
        print(f"(a) per-image loop         {record['a_per_image']:7.2f} img/s (on {len(a_paths)} images)",
              flush=True)

    steps = {"d": d, "c": c, "b": b, "f": f, "a": a}
    for mode in round_order(args.modes, round_index):
        steps[mode]()
    return record


def scaling(args, work: Path) -> dict:
    record = {}
    for factor in (1, 10):
        folder = work / f"images-{factor}x"
        _corpus(folder, args.n * factor, args.size)
        r = clipbatch_run(folder, args.model, args.pretrained, work / f"out-{factor}x", overrides=args.set)
        record[f"{factor}x"] = r
        print(f"{factor:>2}x: {r['rows']} images in {r['seconds']} s ({r['img_per_s']:.2f} img/s), driver peak "
              f"{r['driver_peak_rss_mb']} MB, largest worker {r['worker_peak_rss_mb']} MB", flush=True)
    one, ten = record["1x"], record["10x"]
    record["time_ratio"] = ten["seconds"] / one["seconds"]
    record["driver_rss_ratio"] = ten["driver_peak_rss_mb"] / one["driver_peak_rss_mb"]
    record["worker_rss_ratio"] = ten["worker_peak_rss_mb"] / one["worker_peak_rss_mb"]
    print(f"10x/1x: time {record['time_ratio']:.2f}, driver RSS {record['driver_rss_ratio']:.2f}, "
          f"worker RSS {record['worker_rss_ratio']:.2f}", flush=True)
    return record


def listing(args, work: Path) -> dict:
    """Plan (validate + list) a job over a file of N URIs that need not exist; nothing is read."""
    uris = work / "uris.txt"
    with open(uris, "w") as f:
        for i in range(args.listing):
            f.write(f"s3://bench-bucket/shard{i // 10000:04d}/img{i:08d}.jpg\n")
    code = ("import time, resource, clipbatch.pipeline.job as p; t = time.time(); "
            f"job = p.build({{'input': {{'path': '{uris}'}}, 'model': {{'name': 'ViT-B-32'}}, "
            f"'labels': {{'classes': ['a']}}, 'output': {{'path': '{work / 'plan-out'}'}}}}); "
            "print(job.listing.num_rows, time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    started = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    rows, plan_s, rss_kb = out.split()[-3:]
    record = {"uris": int(rows), "plan_s": float(plan_s), "process_s": time.time() - started,
              "driver_peak_rss_mb": int(rss_kb) // 1024}
    print(f"planned {record['uris']:,} URIs in {record['plan_s']:.1f} s (process {record['process_s']:.1f} s), "
          f"driver peak RSS {record['driver_peak_rss_mb']} MB", flush=True)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default=None,
                   help="default: random weights (speed only), saved once as a local-dir checkpoint")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="build the random weights in every process instead of loading them from a checkpoint")
    p.add_argument("--smoke", action="store_true", help="a few images and a tiny model: checks the harness runs")
    p.add_argument("--scaling", action="store_true")
    p.add_argument("--listing", type=int, default=0, metavar="N")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where loops (a)-(c) run their model; clipbatch (d) picks its device itself")
    p.add_argument("--modes", default="abcdf", help="which of a b c d f to run (default all)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the modes N times, every other round in reverse order, and report medians "
                        "(this machine is noisy)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="spec override for the clipbatch run, e.g. input.jpeg_draft=true")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--forward-worker", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--floor-worker", type=int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--block-rows", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--rows-per-part", type=int, default=4096, help=argparse.SUPPRESS)
    p.add_argument("--model-start-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the record here")
    args = p.parse_args()
    if args.forward_worker:
        print(forward_worker(args.model, args.pretrained, args.batch, args.forward_worker), flush=True)
        return
    global DEVICE
    DEVICE = args.device
    if args.floor_worker:
        floor_worker(args.floor_worker, args.block_rows, args.batch, args.rows_per_part, args.workdir)
        return
    if args.model_start_worker:
        model_start_worker(args.model, args.pretrained)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="clipbatch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.n, args.size, args.model = min(args.n, 48), [160, 120], "clipbatch-demo"
    if not (args.pretrained or args.no_checkpoint or args.listing):
        args.model = random_weights_checkpoint(args.model, work)
    if args.listing:
        record = {"listing": listing(args, work)}
    elif args.scaling:
        record = {"scaling": scaling(args, work)}
    else:
        record = {"compare": compare(args, work)}
    text = json.dumps(record, default=float)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
