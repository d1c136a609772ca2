"""The million-image rehearsal's corpus: img2dataset-style WebDataset shards and loose nested files.

Shards are ``shards/00000.tar`` .. with 10,000 samples each, every sample a
``<key>.jpg`` (a small real JPEG), ``<key>.json`` ({"url", "caption", "key"})
and ``<key>.txt`` (the caption), keys numbered across shards as img2dataset
does. Loose files are ``loose/<a>/<b>/img<i>.jpg`` in 100 x 10 folders.
Images are small (the rehearsal measures the pipeline, not the decoder) and
photo-like: smooth random blobs plus grain, of a few sizes and orientations.
Image i is the same whatever the counts are, so the corpus can be grown.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SIZES = [(96, 72), (128, 96), (72, 96), (80, 80), (120, 90)]
PER_SHARD = 10_000


def jpeg(i: int, seed: int = 0) -> bytes:
    w, h = SIZES[i % len(SIZES)]
    rng = np.random.default_rng([seed, i])
    small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-10, 10, size=(h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def make_shard(args) -> str:
    folder, shard = args
    path = folder / f"{shard:05d}.tar"
    if path.exists():
        return str(path)
    partial = path.with_suffix(".tar.tmp")
    with tarfile.open(partial, "w") as tar:
        for i in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
            key = f"{i:09d}"
            caption = f"synthetic image {i}"
            _add(tar, f"{key}.jpg", jpeg(i))
            _add(tar, f"{key}.json", json.dumps({"url": f"https://example.com/{key}.jpg", "caption": caption,
                                                 "key": key}).encode())
            _add(tar, f"{key}.txt", caption.encode())
    partial.rename(path)
    return str(path)


def make_loose(args) -> int:
    folder, start, stop = args
    for i in range(start, stop):
        path = folder / f"{i // 1000:03d}" / f"{(i // 100) % 10}" / f"img{i:07d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(10_000_000 + i))
    return stop - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folder", type=Path)
    p.add_argument("--shards", type=int, default=100, help="WebDataset tars of 10,000 samples (default 100)")
    p.add_argument("--loose", type=int, default=100_000, help="loose files in nested folders (default 100,000)")
    args = p.parse_args()
    started = time.time()
    (args.folder / "shards").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        for path in pool.map(make_shard, [(args.folder / "shards", s) for s in range(args.shards)]):
            print(path, f"{time.time() - started:.0f}s", flush=True)
        step = 10_000
        ranges = [(args.folder / "loose", a, min(a + step, args.loose)) for a in range(0, args.loose, step)]
        print(f"loose files: {sum(pool.map(make_loose, ranges)):,}", flush=True)
    print(f"corpus ready in {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
