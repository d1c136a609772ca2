"""Small real open_clip models and real encoded images for the tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

TINY_VIT_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_tiny_model(folder: Path, seed: int = 0, siglip: bool = False, vision_cfg: dict | None = None) -> Path:
    """A seeded, randomly initialised open_clip CLIP saved as local-dir (SigLIP-style with a logit_bias);
    vision_cfg replaces the image tower's config (a slower model for jobs that must last a while)."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    cfg = {**TINY_VIT_CFG, **({"vision_cfg": vision_cfg} if vision_cfg else {})}
    if siglip:
        cfg = {**cfg, "init_logit_bias": -3.0, "init_logit_scale": float(np.log(10.0))}
    model = open_clip.model.CLIP(**cfg)
    # Random init gives near-identical text embeddings; spread them so probabilities are informative.
    with torch.no_grad():
        model.text_projection.mul_(8.0)
        if not siglip:
            model.logit_scale.fill_(float(np.log(30.0)))
    from clipbatch.model.load import save_local_dir
    pre = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
           "interpolation": "bicubic", "resize_mode": "shortest"}
    return save_local_dir(model, cfg, folder, pre)


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * (seed % 7 + 1)) % 256, (y * (seed % 5 + 2)) % 256, ((x + y) * 3 + seed * 40) % 256], -1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def mixed_images(folder: Path, n: int = 24) -> list[Path]:
    """n real encoded images of mixed formats, modes and sizes, in nested folders."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds = [("JPEG", "RGB", "jpg"), ("PNG", "RGB", "png"), ("WEBP", "RGB", "webp"), ("GIF", "P", "gif"),
             ("JPEG", "L", "jpg"), ("PNG", "RGBA", "png"), ("JPEG", "CMYK", "jpg"), ("TIFF", "RGB", "tiff"),
             ("PNG", "L", "png"), ("BMP", "RGB", "bmp")]
    sizes = [(97, 61), (320, 240), (64, 64), (50, 130), (640, 480), (33, 200)]
    paths = []
    for i in range(n):
        fmt, mode, ext = kinds[i % len(kinds)]
        w, h = sizes[i % len(sizes)]
        img = Image.fromarray(_pattern(w, h, i))
        if mode == "RGBA":
            alpha = Image.fromarray(((np.arange(w)[None, :] * 255 // max(w - 1, 1)) * np.ones((h, 1))).astype(np.uint8))
            img = img.convert("RGBA")
            img.putalpha(alpha)
        elif mode == "P":
            img = img.convert("P", palette=Image.Palette.ADAPTIVE)
        else:
            img = img.convert(mode)
        sub = folder / f"group{i % 3}"
        sub.mkdir(exist_ok=True)
        path = sub / f"img{i:03d}.{ext}"
        path.write_bytes(encode(img, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {})))
        paths.append(path)
    return paths


def chromium_dom(url: str) -> str:
    """The page's DOM after its load handlers ran, in a real headless Chromium."""
    import subprocess

    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    return subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
