"""Steady rate of `clipbatch run`: the marginal img/s of a 2N-image job over an N-image one.

    python bench/steady.py --images 4000                          # this checkout, the demo model
    python bench/steady.py --images 4000 --code before=../old --code after=.   # two checkouts, in turn

Each run is a fresh `python -m clipbatch.cli run` process with default compute settings, as a user
runs it. Start-up (Python, Ray, model load, listing) is the same in both runs, so
N / (t(2N) - t(N)) is the rate once running; start-up is reported on its own line as
t(N) - N / rate. Several --code roots are run in turn, every other round in reverse order, so that
a steady drift of the machine's speed cancels. Writes a JSON record under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from corpus import make_corpus  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def write_job(work: Path, paths: list[Path], model: str, n: int) -> Path:
    listing = work / f"list-{n}.txt"
    listing.write_text("".join(f"{p}\n" for p in paths[:n]))
    spec = {"name": f"steady-{n}", "input": {"path": str(listing)}, "model": {"name": model},
            "labels": {"classes": [f"class {i}" for i in range(100)], "templates": ["a photo of a {}."]},
            "output": {"path": str(work / "out"), "mode": "overwrite"}}
    job = work / f"job-{n}.yaml"
    job.write_text(json.dumps(spec))  # JSON is YAML
    return job


def timed_run(root: Path, job: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(root.resolve())}
    env.pop("RAY_ADDRESS", None)
    began = time.time()
    proc = subprocess.run([sys.executable, "-m", "clipbatch.cli", "run", str(job)], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"clipbatch run failed under {root}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.time() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4000, help="N: the jobs have N and 2N images")
    p.add_argument("--model", default="clipbatch-demo")
    p.add_argument("--code", action="append", metavar="NAME=ROOT", help="a checkout to run (repeatable)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/clipbatch-steady"))
    args = p.parse_args()
    codes = dict(c.split("=", 1) for c in args.code) if args.code else {"this": "."}
    args.workdir.mkdir(parents=True, exist_ok=True)
    began = time.time()
    paths = sorted((args.workdir / "corpus").rglob("*.jpg"))[:2 * args.images]  # image i is the same for any n
    if len(paths) < 2 * args.images:
        paths = sorted(make_corpus(args.workdir / "corpus", 2 * args.images))
    print(f"corpus: {len(paths)} JPEGs (640x480 and 1024x768) in {time.time() - began:.0f} s", flush=True)
    jobs = {n: write_job(args.workdir, paths, args.model, n) for n in (args.images, 2 * args.images)}
    runs: dict[str, list[dict]] = {name: [] for name in codes}
    for r in range(args.rounds):
        order = list(codes) if r % 2 == 0 else list(reversed(codes))
        for name in order:
            t1, t2 = (timed_run(Path(codes[name]), jobs[n]) for n in jobs)
            rate = args.images / (t2 - t1) if t2 > t1 else float("nan")
            runs[name].append({"t_n_s": round(t1, 2), "t_2n_s": round(t2, 2), "steady_img_per_s": round(rate, 2),
                               "start_up_s": round(t1 - args.images / rate, 2)})
            print(f"round {r + 1} {name:>8}: {args.images} images {t1:6.1f} s, {2 * args.images} images "
                  f"{t2:6.1f} s -> steady {rate:7.1f} img/s, start-up {runs[name][-1]['start_up_s']:.1f} s",
                  flush=True)
    medians = {name: statistics.median(r["steady_img_per_s"] for r in rs) for name, rs in runs.items()}
    first = next(iter(medians))
    for name, rate in medians.items():
        print(f"median {name:>8}: {rate:7.1f} img/s steady ({rate / medians[first]:.2f}x {first}), start-up "
              f"{statistics.median(r['start_up_s'] for r in runs[name]):.1f} s")
    record = {"bench": "steady", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "model": args.model, "images": args.images, "codes": codes,
              "runs": runs, "median_steady_img_per_s": medians}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now(timezone.utc):%Y-%m-%d}-{socket.gethostname()}-steady-{args.model}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"record: {out}")


if __name__ == "__main__":
    main()
