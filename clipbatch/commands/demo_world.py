"""A procedural world of coloured shapes: 6 colours x 6 shapes = 36 classes, 64x64 RGB.

Everything is drawn with PIL/numpy from a seeded ``numpy.random.Generator``, so a
seed and a class give the same pictures on any machine. Six colour x shape
combinations (``HELD_OUT``) are never drawn or named during training; the demo
asks the model to recognise them from the colour and the shape it learned apart.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPER = 2  # shapes are drawn at 2x and downsampled: cheap antialiasing

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 50, 185),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")

CLASSES: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]
# Never shown in training (no images, no captions); each colour and each shape once.
HELD_OUT: list[str] = ["red star", "green ring", "blue triangle", "yellow circle", "purple square", "orange cross"]
TRAIN_CLASSES: list[str] = [c for c in CLASSES if c not in HELD_OUT]

TRAIN_SEED = 1234   # training batches
VAL_SEED = 4321     # the accuracy the training script prints and records
DEMO_SEED = 2024    # ``clipbatch demo``; training never draws from it

# Caption wordings used in training ({c} colour, {s} shape).
TRAIN_CAPTIONS = (
    "a photo of a {c} {s}",
    "a {c} {s}",
    "a {c} {s} on a background",
    "a drawing of a {c} shape that is a {s}",
    "a picture of a {c} {s}",
    "an image of a {c} {s}",
    "a {s} coloured {c}",
    "a {s} that is {c}",
    "one {c} {s}",
    "a {c} {s} shape",
    "{c} {s}",
    "a rendering of a {c} {s}",
)
# Zero-shot prompt templates; "an illustration of a {}." is a wording training never used.
DEMO_TEMPLATES: list[str] = ["a photo of a {}.", "a {} on a background.", "an illustration of a {}."]

N_BACKGROUNDS = 25
_TINTS = ((235, 232, 225), (175, 175, 178), (90, 92, 96), (215, 200, 170), (170, 185, 200))
_BG_KINDS = ("plain", "hgradient", "vgradient", "stripes", "noise")


def split_class(name: str) -> tuple[str, str]:
    colour, shape = name.split(" ", 1)
    return colour, shape


def captions(colour: str, shape: str) -> list[str]:
    return [t.format(c=colour, s=shape) for t in TRAIN_CAPTIONS]


def _background(variant: int, rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] float32 background: 5 kinds x 5 low-saturation tints, jittered."""
    n = IMAGE_SIZE
    kind = _BG_KINDS[variant % len(_BG_KINDS)]
    tint = np.array(_TINTS[variant // len(_BG_KINDS)], np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
    if kind == "plain":
        return np.broadcast_to(tint, (n, n, 3)).astype(np.float32)
    if kind in ("hgradient", "vgradient"):
        other = tint + rng.uniform(-70, 70) + rng.uniform(-8, 8, 3)
        ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
        ramp = ramp[None, :, None] if kind == "hgradient" else ramp[:, None, None]
        return tint + (other - tint) * ramp + np.zeros((n, n, 3), np.float32)
    if kind == "stripes":
        period = rng.uniform(5, 14)
        angle = rng.uniform(0, math.pi)
        y, x = np.mgrid[0:n, 0:n].astype(np.float32)
        wave = np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period)
        return tint + (rng.uniform(12, 35) * wave)[..., None]
    noise = rng.normal(0, rng.uniform(10, 30), (n // 4, n // 4, 1)).astype(np.float32)
    noise = np.repeat(np.repeat(noise, 4, 0), 4, 1)
    return tint + noise


def _polygon(shape: str) -> list[np.ndarray]:
    """Unit-size outlines (radius about 1), as lists of [K, 2] point arrays."""
    if shape in ("circle", "ring"):
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        outer = np.stack([np.cos(t), np.sin(t)], 1)
        return [outer, outer * 0.55] if shape == "ring" else [outer]
    if shape == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.85]
    if shape == "triangle":
        t = np.array([-90, 30, 150]) * math.pi / 180
        return [np.stack([np.cos(t), np.sin(t)], 1) * 1.1]
    if shape == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
        return [np.stack([np.cos(t) * r, np.sin(t) * r], 1)]
    if shape == "cross":
        a, b = 1.0, 0.33
        return [np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                          [-a, b], [-a, -b], [-b, -b]], np.float64)]
    raise ValueError(f"unknown shape {shape!r}")


_OUTLINES = {s: _polygon(s) for s in SHAPES}


def render(colour: str, shape: str, rng: np.random.Generator) -> Image.Image:
    """One 64x64 RGB picture of a ``colour`` ``shape``: random place, size, rotation, aspect,
    colour jitter, background variant and pixel noise, all drawn from ``rng``."""
    n = IMAGE_SIZE
    big = n * _SUPER
    radius = rng.uniform(0.2, 0.38) * n
    aspect = math.exp(rng.uniform(-0.25, 0.25))
    angle = rng.uniform(0, 2 * math.pi)
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, n - margin, 2)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    scale = np.array([aspect, 1 / aspect]) * radius

    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for i, outline in enumerate(_OUTLINES[shape]):
        pts = (outline * scale) @ rot.T + (cx, cy)
        draw.polygon([tuple(p) for p in (pts * _SUPER)], fill=255 if i == 0 else 0)
    alpha = np.asarray(mask.resize((n, n), Image.BILINEAR), np.float32)[..., None] / 255.0

    base = np.array(COLOURS[colour], np.float32)
    fg = np.clip(base * rng.uniform(0.82, 1.12) + rng.uniform(-18, 18, 3), 0, 255).astype(np.float32)
    bg = _background(int(rng.integers(N_BACKGROUNDS)), rng)
    img = bg * (1 - alpha) + fg * alpha
    img += rng.normal(0, rng.uniform(0, 10), img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def sample(seed: int, n_per_class: int, classes: list[str] | None = None) -> Iterator[tuple[Image.Image, str]]:
    """``n_per_class`` pictures of each class, class by class; class i of ``CLASSES`` always gets
    the same pictures for a given seed, whatever else is asked for."""
    for name in (CLASSES if classes is None else classes):
        rng = np.random.default_rng([seed, CLASSES.index(name)])
        colour, shape = split_class(name)
        for _ in range(n_per_class):
            yield render(colour, shape, rng), name
