"""Bytes -> RGB uint8 pixels, resized and center-cropped as open_clip does.

Runs in CPU tasks (fused into the encoder actors on CPU clusters). The geometric
part of the model's own eval transform (open_clip ``image_transform_v2`` without
ToTensor/Normalize) is applied here. For open_clip's default config, RGB and
greyscale images are decoded into a tensor (JPEGs by torchvision's libjpeg-turbo)
and resized by torch's uint8 antialiased kernels, which follow PIL's within 2
levels at a fraction of its cost (tests/unit/test_decode.py); other image modes
and configs take PIL and open_clip's own transform exactly. Pixels travel as
uint8 (4x smaller than float32); the encoder actor scales and normalizes them on
its device. An image that cannot be read or decoded becomes a row with ``error``
set and blank pixels: it is never dropped.
"""

from __future__ import annotations

import functools
import io
import json

import numpy as np
from PIL import Image, ImageOps

from clipbatch.pipeline.rows import batch_contents, for_each_image

# Marks width/height of rows that failed, until the encoder turns them into nulls.
FAILED_SIZE = -1


def _shortest_edge_then_center_crop(size: int, resample: int):
    """open_clip's default eval geometry (resize_mode 'shortest', square size) without torch.

    The same arithmetic as torchvision's Resize(size) and CenterCrop(size) on PIL images,
    then convert('RGB'), in the same order; tests/unit/test_decode.py checks it pixel for pixel
    against open_clip's own transform. It keeps decode workers free of torch's import.
    """
    def apply(img: Image.Image) -> Image.Image:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        img = img.resize((new_w, new_h), resample)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        return img.crop((left, top, left + size, top + size)).convert("RGB")
    return apply


def _open_clip_geometry(cfg):
    """Any other preprocess config: open_clip's own eval transform minus ToTensor/Normalize."""
    from open_clip.transform import image_transform_v2

    steps = image_transform_v2(cfg, is_train=False).transforms
    # The last two steps are ToTensor and Normalize; those happen on the encoder's device.
    assert type(steps[-1]).__name__ == "Normalize" and "ToTensor" in type(steps[-2]).__name__, steps

    def apply(img: Image.Image) -> Image.Image:
        for step in steps[:-2]:
            img = step(img)
        return img
    return apply


def _tensor_shortest_edge_then_center_crop(size: int, mode: str):
    """The same geometry on a uint8 CHW tensor with torch's antialiased resize, which follows PIL's
    kernels (within one level of 255: tests/unit/test_decode.py) at a fraction of PIL's cost."""
    import torch

    def apply(chw):
        h, w = chw.shape[1:]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        resized = torch.nn.functional.interpolate(chw[None], size=(new_h, new_w), mode=mode, antialias=True)[0]
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        return resized[:, top:top + size, left:left + size].permute(1, 2, 0)  # HWC, on chw's device
    return apply


@functools.lru_cache(maxsize=8)
def tensor_transform(preprocess_cfg_json: str):
    """The tensor geometry for a config that has one (open_clip's default: shortest edge, square, RGB,
    bicubic or bilinear), else None."""
    cfg = json.loads(preprocess_cfg_json)
    height, width = np.broadcast_to(cfg.get("size", 224), 2)
    if cfg.get("resize_mode", "shortest") == "shortest" and height == width and cfg.get("mode", "RGB") == "RGB" \
            and cfg.get("interpolation", "bicubic") in ("bicubic", "bilinear"):
        return _tensor_shortest_edge_then_center_crop(int(height), cfg.get("interpolation", "bicubic"))
    return None


@functools.lru_cache(maxsize=8)
def _geometric_transform(preprocess_cfg_json: str):
    """(callable PIL image -> resized, cropped RGB PIL image, (height, width)) for a preprocess config."""
    cfg = json.loads(preprocess_cfg_json)
    height, width = np.broadcast_to(cfg.get("size", 224), 2)
    if cfg.get("resize_mode", "shortest") == "shortest" and height == width and cfg.get("mode", "RGB") == "RGB":
        resample = Image.Resampling.BILINEAR if cfg.get("interpolation") == "bilinear" else Image.Resampling.BICUBIC
        return _shortest_edge_then_center_crop(int(height), resample), (int(height), int(width))
    from open_clip.transform import PreprocessCfg

    return _open_clip_geometry(PreprocessCfg(**cfg)), (int(height), int(width))


def pixel_size(preprocess_cfg_json: str) -> tuple[int, int]:
    """(height, width) of the pixels a config cuts."""
    return _geometric_transform(preprocess_cfg_json)[1]


_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


# clipbatch checks input.max_pixels itself, from the header, before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None


def _open(data: bytes, jpeg_draft: bool, draft_size: int, max_pixels: int | None) -> tuple[Image.Image, int, int]:
    """Encoded bytes -> (upright RGB-convertible PIL image, original width, original height)."""
    img, width, height = read_header(data, max_pixels)
    with img:
        return _load_upright(img, jpeg_draft, draft_size), width, height


def _load_upright(img: Image.Image, jpeg_draft: bool, draft_size: int) -> Image.Image:
    """An opened image decoded (a JPEG at a reduced scale with jpeg_draft) and turned upright."""
    if jpeg_draft and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    return ImageOps.exif_transpose(img)


def read_header(data: bytes, max_pixels: int | None) -> tuple[Image.Image, int, int]:
    """The image opened but not decoded, and its upright width and height; a decompression bomb
    (more than max_pixels) is refused here, before any pixel is decoded."""
    if not data:
        raise ValueError("empty file")
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    if max_pixels and width * height > max_pixels:
        img.close()
        raise ValueError(f"{width}x{height} = {width * height:,} pixels is over input.max_pixels "
                         f"({max_pixels:,})")
    if img.getexif().get(0x0112) in _SWAPS_AXES:
        width, height = height, width
    return img, width, height


def _pixels(img: Image.Image, preprocess_cfg_json: str) -> np.ndarray:
    pixels = np.asarray(_geometric_transform(preprocess_cfg_json)[0](img), dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"unexpected decoded shape {pixels.shape}")
    return pixels


def decode_all(data: bytes, cfgs: list[str], jpeg_draft: bool, draft_size: int,
                max_pixels: int | None) -> tuple[list[np.ndarray], int, int]:
    """One encoded image -> its pixels for each config, original width and height.

    RGB and greyscale images are resized by torch (the same kernels as PIL's, several times faster),
    and plain JPEGs are also decoded by torchvision's libjpeg-turbo into a tensor directly; every other
    mode (alpha, palette, 16-bit, CMYK ...) and config takes PIL and open_clip's own transform, exactly.
    """
    tensor_cfgs = [tensor_transform(c) for c in cfgs]
    img, width, height = read_header(data, max_pixels)
    with img:
        if not all(tensor_cfgs) or img.mode not in ("RGB", "L"):
            upright = _load_upright(img, jpeg_draft, draft_size)
            return [_pixels(upright, c) for c in cfgs], width, height
        chw = _jpeg_tensor(data) if img.format == "JPEG" and not jpeg_draft else None
        if chw is None:
            chw = _as_tensor(_load_upright(img, jpeg_draft, draft_size).convert("RGB"))
    return [apply(chw).numpy() for apply in tensor_cfgs], width, height


def _jpeg_tensor(data: bytes):
    """A JPEG as an upright RGB uint8 CHW tensor by torchvision, or None where it declines the file."""
    import torch
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # a torchvision without its (deprecated) image decoders: PIL decodes
        return None
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                           apply_exif_orientation=True)
    except RuntimeError:  # a JPEG libjpeg-turbo's strict reader refuses; PIL may still take it
        return None


def _as_tensor(img: Image.Image):
    import torch

    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def _draft_size(cfgs_json: list[str]) -> int:
    return max(max(_geometric_transform(c)[1]) for c in cfgs_json)


def decode_image(data: bytes, preprocess_cfg_json: str, jpeg_draft: bool = False,
                 max_pixels: int | None = None) -> tuple[np.ndarray, int, int]:
    """One encoded image -> (pixels HxWx3 uint8, original width, original height).

    An image whose header announces more than max_pixels is refused before it is decoded
    (a decompression bomb would otherwise take the worker's memory).

    jpeg_draft lets libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the model's input
    size): several times faster on large JPEGs, slightly different pixels from open_clip's.
    """
    (pixels,), width, height = decode_all(data, [preprocess_cfg_json], jpeg_draft,
                                           _draft_size([preprocess_cfg_json]), max_pixels)
    return pixels, width, height


def pixels_column(i: int) -> str:
    """The batch column of the i-th distinct preprocess config: pixels, pixels_1, pixels_2, ..."""
    return "pixels" if i == 0 else f"pixels_{i}"


def decode_configs(preprocess_cfgs: list[dict]) -> list[dict]:
    """The distinct preprocess configs of a job's models, in member order: each image is decoded
    once and cut once per distinct input size/preprocessing (pixels_column(i) for the i-th)."""
    return [c for i, c in enumerate(preprocess_cfgs) if c not in preprocess_cfgs[:i]]


def read_and_decode(batch: dict[str, np.ndarray], preprocess_cfg_json: str,
                    storage_options: dict, jpeg_draft: bool = False,
                    max_pixels: int | None = None, more_cfgs_json: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Ray Data batch -> the same batch with width, height, pixels and error.

    Image-file inputs arrive as {id, source} and are fetched here; shard inputs arrive with their
    bytes in ``data`` and the reader's ``error`` (see shards.py). Other columns pass through.
    An ensemble whose models differ in input size passes their other preprocess configs as
    more_cfgs_json: each image is fetched and decoded once and cut once per config, into
    ``pixels_1``, ``pixels_2``, ...
    """
    cfgs = [preprocess_cfg_json, *more_cfgs_json]
    n = len(batch["id"])
    pixels = [np.zeros((n, *_geometric_transform(c)[1], 3), dtype=np.uint8) for c in cfgs]
    draft_size = _draft_size(cfgs)
    widths = np.full(n, FAILED_SIZE, dtype=np.int32)
    heights = np.full(n, FAILED_SIZE, dtype=np.int32)
    contents, errors = batch_contents(batch, storage_options)

    def decode(i: int, data: bytes) -> None:
        cut, widths[i], heights[i] = decode_all(data, cfgs, jpeg_draft, draft_size, max_pixels)
        for out, one in zip(pixels, cut):
            out[i] = one

    for_each_image(contents, errors, decode)
    passed = {k: v for k, v in batch.items() if k not in ("data", "error")}
    return {**passed, "width": widths, "height": heights, "error": errors,
            **{pixels_column(k): p for k, p in enumerate(pixels)}}
