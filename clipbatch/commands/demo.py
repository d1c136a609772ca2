"""`clipbatch demo`: label a generated, labeled image set with the bundled model, through the normal pipeline.

The demo draws pictures of all 36 colour x shape classes from a seed the model
never trained on, saves them as an image folder (folder name = true class),
writes the job spec it runs to ``DIR/job.yaml``, runs it exactly as
``clipbatch run DIR/job.yaml`` would, and scores the Parquet output against the
folder names: overall, worst classes, and the 6 combinations the model never saw.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from clipbatch.commands import demo_world as world
from clipbatch.pipeline.job import build

MIN_ACCURACY = 0.90


def write_images(images_dir: Path, n: int, seed: int) -> int:
    """n pictures spread over the 36 classes as evenly as possible, as PNG (lossless)."""
    if n < 1:
        raise ValueError("--n must be at least 1")
    per_class = [n // len(world.CLASSES) + (1 if i < n % len(world.CLASSES) else 0)
                 for i in range(len(world.CLASSES))]
    written = 0
    for name, count in zip(world.CLASSES, per_class):
        if count == 0:
            continue
        folder = images_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, (img, _) in enumerate(world.sample(seed, count, [name])):
            img.save(folder / f"{i:04d}.png")
            written += 1
    return written


def job_spec(out_dir: Path) -> dict:
    return {"name": "clipbatch-demo",
            "input": {"path": str(out_dir / "images")},
            "model": {"name": "clipbatch-demo"},
            "labels": {"classes": list(world.CLASSES), "templates": list(world.DEMO_TEMPLATES)},
            "output": {"path": str(out_dir / "output"), "mode": "overwrite"}}


def score(output_dir: Path, n_images: int) -> dict:
    """Top-1 accuracy of DIR/output against the folder names (missing or failed rows count as wrong)."""
    parts = sorted(output_dir.glob("part-*.parquet"))
    table = pq.ParquetDataset([str(p) for p in parts]).read(columns=["id", "label", "score"]) if parts else None
    ids = table.column("id").to_pylist() if table is not None else []
    labels = table.column("label").to_pylist() if table is not None else []
    per_class: dict[str, list[int]] = {c: [0, 0] for c in world.CLASSES}
    for id_, label in zip(ids, labels):
        truth = id_.replace("\\", "/").split("/", 1)[0]
        per_class.setdefault(truth, [0, 0])
        per_class[truth][0] += int(label == truth)
        per_class[truth][1] += 1
    correct = sum(c for c, _ in per_class.values())
    class_acc = {c: r / t for c, (r, t) in per_class.items() if t}
    held = [per_class[c] for c in world.HELD_OUT]
    held_total = sum(t for _, t in held)
    seen_right = sum(r for c, (r, t) in per_class.items() if c not in world.HELD_OUT)
    seen_total = sum(t for c, (r, t) in per_class.items() if c not in world.HELD_OUT)
    return {"rows": len(ids), "images": n_images,
            "accuracy": correct / n_images if n_images else 0.0,
            "seen_accuracy": seen_right / seen_total if seen_total else 0.0,
            "held_out_accuracy": sum(r for r, _ in held) / held_total if held_total else 0.0,
            "held_out_per_class": {c: class_acc.get(c) for c in world.HELD_OUT},
            "worst_classes": sorted(class_acc.items(), key=lambda kv: (kv[1], kv[0]))[:5],
            "per_class": class_acc}


def run_demo(out_dir, n: int = 360, seed: int = world.DEMO_SEED) -> dict:
    """Generate the set, run the job as ``clipbatch run`` would, score it; returns the metrics."""
    out_dir = Path(out_dir).expanduser().resolve()
    images_dir = out_dir / "images"
    if images_dir.exists():  # a previous demo's pictures; regenerate so --n and --seed are what they say
        shutil.rmtree(images_dir)
    t0 = time.time()
    n_images = write_images(images_dir, n, seed)
    generate_s = time.time() - t0
    spec_path = out_dir / "job.yaml"
    spec_path.write_text(yaml.safe_dump(job_spec(out_dir), sort_keys=False))
    print(f"clipbatch demo: {n_images} pictures of {len(world.CLASSES)} classes (seed {seed}) in {images_dir} "
          f"({generate_s:.1f}s); running {spec_path}", flush=True)

    summary = build(str(spec_path)).run()
    metrics = score(out_dir / "output", n_images)
    metrics.update({"seed": seed, "errors": summary.errors, "complete": summary.complete,
                    "seconds": summary.seconds, "images_per_s": summary.images_per_s, "device": summary.device,
                    "output": summary.output, "spec": str(spec_path), "images_dir": str(images_dir)})
    return metrics


def print_report(m: dict) -> None:
    def pct(x):
        return "n/a" if x is None else f"{x:.1%}"

    print(f"\nclipbatch demo: {m['rows']}/{m['images']} images labeled ({m['errors']} errors) on {m['device']}, "
          f"{m['images_per_s']:.0f} img/s, {m['seconds']:.1f}s in all")
    print(f"top-1 accuracy      {pct(m['accuracy'])} over {len(m['per_class'])} classes "
          f"(seen combinations {pct(m['seen_accuracy'])})")
    print(f"never-seen combos   {pct(m['held_out_accuracy'])}: "
          + ", ".join(f"{c} {pct(a)}" for c, a in m["held_out_per_class"].items()))
    print("worst classes       " + ", ".join(f"{c} {pct(a)}" for c, a in m["worst_classes"]))
    print(f"results             {m['output']}/part-*.parquet")
    print(f"job spec            {m['spec']}  (rerun: clipbatch run {m['spec']})")
    verdict = "PASS" if m["accuracy"] >= MIN_ACCURACY else "FAIL"
    print(f"{verdict}: accuracy {pct(m['accuracy'])} (needs >= {MIN_ACCURACY:.0%})", flush=True)
