"""The GPU check of the feed-rate work, in one call of the device tool (bench/gpu_check.sh runs it).

    python bench/gpu_check.py --out $OUT            # on the GPU machine: 50,000 images, ViT-B-32 and ViT-L-14
    python bench/gpu_check.py --out /tmp/x --dry-run   # here, on CPU: the same steps, small

It generates the web-like JPEG corpus on the machine (bench/feed.py's mix), then measures in one run:
  - the pure forward rate of ViT-B-32 and ViT-L-14 in fp16 (batch 512 / 128, random weights);
  - the bare decode loop (clipbatch's default CPU decode) on all cores, no Ray;
  - clipbatch, ViT-B-32: N and 2N images (2N = 50,000) with input.decode cpu, then gpu: the steady
    rate (2N over its encoder's span), the marginal rate of 2N over N, the end-to-end rate of 2N
    with start-up, Ray Data's CPU-ms per image per stage;
  - clipbatch, ViT-L-14 on 5,000 and 10,000 images (CPU decode);
  - the GPU's utilization, sampled every 0.5 s by nvidia-smi while each job runs.
One JSON record: <out>/gpu_check.json (and bench/results/ when run from a checkout that keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from feed import bare_loop, run_job, web_corpus  # noqa: E402


class GpuUtilization(threading.Thread):
    """nvidia-smi's utilization.gpu every 0.5 s while a job runs (nothing where there is no nvidia-smi)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[int] = []
        self.proc = None

    def run(self) -> None:
        if not shutil.which("nvidia-smi"):
            return
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "500"], stdout=subprocess.PIPE, text=True)
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def summary(self) -> dict:
        if self.proc:
            self.proc.terminate()
        busy = sorted(self.samples)
        return {"samples": len(busy), "mean_pct": round(sum(busy) / len(busy), 1) if busy else None,
                "median_pct": busy[len(busy) // 2] if busy else None}


def forward_rate(model: str, batch: int, seconds: float, device: str) -> float:
    """img/s of the image tower's forward pass on ready fp16 tensors (fp32 on CPU)."""
    import open_clip
    import torch
    net = open_clip.create_model(model, precision="fp16" if device == "cuda" else "fp32", device=device).eval()
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
    with torch.inference_mode():
        net.encode_image(x)
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            net.encode_image(x)
            done += batch
        if device == "cuda":
            torch.cuda.synchronize()
    return round(done / (time.perf_counter() - began), 1)


def job(work: Path, paths: list[Path], model: str, n: int, decode: str, batch: int | str) -> Path:
    listing = work / f"list-{n}.txt"
    listing.write_text("".join(f"{p}\n" for p in paths[:n]))
    spec = {"name": f"gpu-{model}-{decode}-{n}", "input": {"path": str(listing), "decode": decode},
            "model": {"name": model}, "labels": {"classes": [f"class {i}" for i in range(100)]},
            "compute": {"batch_size": batch}, "output": {"path": str(work / f"out-{model}-{decode}-{n}"),
                                                         "mode": "overwrite", "embedding_dtype": "float16"}}
    path = work / f"job-{model}-{decode}-{n}.yaml"
    path.write_text(json.dumps(spec))
    return path


def measured(work: Path, paths: list[Path], model: str, n: int, decode: str, batch, env: dict) -> dict:
    """N then 2N images: the marginal rate, the end-to-end rate of 2N, utilization, stage CPU."""
    first = run_job(job(work, paths, model, n, decode, batch), env)
    gpu = GpuUtilization()
    gpu.start()
    second = run_job(job(work, paths, model, 2 * n, decode, batch), env, stats=True, images=2 * n)
    steady = 2 * n / second["encoder_span_s"]
    return {"images": 2 * n, "steady_img_per_s": round(steady, 1),
            "marginal_img_per_s": round(n / (second["seconds"] - first["seconds"]), 1),
            "end_to_end_img_per_s": round(2 * n / second["seconds"], 1),
            "end_to_end_over_steady": round(2 * n / second["seconds"] / steady, 3),
            "start_up_s": round(second["seconds"] - second["encoder_span_s"], 1), "gpu_utilization": gpu.summary(),
            "stage_cpu_ms_per_image": second["stage_cpu_ms"], "driver_peak_mb": second["driver_mb"],
            "worker_peak_mb": second["worker_mb"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="small sizes, on CPU")
    args = p.parse_args()
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_b32, n_l14 = (20, 4) if args.dry_run else (25_000, 5_000)
    work = Path("/tmp/gpu-check")
    work.mkdir(parents=True, exist_ok=True)
    record: dict = {"bench": "gpu_check", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "host": socket.gethostname(), "cores": os.cpu_count(), "device": device,
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "dry_run": args.dry_run}
    began = time.time()
    paths = sorted(web_corpus(work / "corpus", 2 * n_b32))
    record["corpus_s"] = round(time.time() - began, 1)
    seconds = 2 if args.dry_run else 10
    record["forward_img_per_s"] = {"ViT-B-32": forward_rate("ViT-B-32", 512 if device == "cuda" else 8, seconds,
                                                            device),
                                   "ViT-L-14": forward_rate("ViT-L-14", 128 if device == "cuda" else 2, seconds,
                                                            device)}
    print("forward:", record["forward_img_per_s"], flush=True)
    record["bare_loop_img_per_s"] = bare_loop(paths, "default")
    print("bare decode loop:", record["bare_loop_img_per_s"], flush=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    batch = "auto"
    for decode in ("cpu", "gpu"):
        record[f"ViT-B-32_{decode}_decode"] = measured(work, paths, "ViT-B-32", n_b32, decode, batch, env)
        print(f"ViT-B-32, decode {decode}:", record[f"ViT-B-32_{decode}_decode"], flush=True)
    record["ViT-L-14_cpu_decode"] = measured(work, paths, "ViT-L-14", n_l14, "cpu", batch, env)
    print("ViT-L-14:", record["ViT-L-14_cpu_decode"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
