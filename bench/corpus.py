"""Build a benchmark corpus: N real JPEGs of realistic sizes, with photo-like content."""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SIZES = [(640, 480), (1024, 768)]


def photo(i: int, w: int, h: int, seed: int = 0) -> Image.Image:
    """Image i: smooth random blobs plus grain, which compresses and decodes like a photo."""
    rng = np.random.default_rng([seed, i])
    small = rng.integers(0, 256, size=(h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, size=(h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _make_one(args) -> Path:
    folder, i, (w, h), seed, quality = args
    path = folder / f"{i // 1000:03d}" / f"img{i:06d}.jpg"
    path.parent.mkdir(exist_ok=True)
    photo(i, w, h, seed).save(path, quality=quality)
    return path


def make_corpus(folder: Path, n: int, sizes=SIZES, seed: int = 0, quality: int = 90) -> list[Path]:
    """Smooth random blobs plus grain: compresses and decodes like a photo, unlike pure noise.

    Image i is the same whatever n is, so a 10x corpus contains the 1x one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder, i, sizes[i % len(sizes)], seed, quality) for i in range(n)]
    with ProcessPoolExecutor() as pool:
        return list(pool.map(_make_one, jobs, chunksize=64))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folder", type=Path)
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--size", action="append", help="WxH, repeatable (default 640x480 and 1024x768)")
    args = p.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.size] if args.size else SIZES
    make_corpus(args.folder, args.n, sizes)


if __name__ == "__main__":
    main()
