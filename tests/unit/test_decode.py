"""Decode geometry is open_clip's, pixel for pixel; odd image modes decode to RGB."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageOps

from clipbatch.pipeline.decode import _geometric_transform, _open_clip_geometry, decode_image
from helpers import encode, mixed_images


def cfg_json(**kw) -> str:
    base = {"size": 224, "mode": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
            "resize_mode": "shortest", "fill_color": 0}
    return json.dumps({**base, **kw})


@pytest.mark.parametrize("size, interpolation", [(224, "bicubic"), (64, "bicubic"), (336, "bilinear"), (97, "bicubic")])
def test_fast_geometry_equals_open_clip(tmp_path, size, interpolation):
    cfg = cfg_json(size=size, interpolation=interpolation)
    fast, _ = _geometric_transform(cfg)
    reference = _open_clip_geometry(PreprocessCfg(**json.loads(cfg)))
    paths = mixed_images(tmp_path, n=20)
    odd = [Image.new("RGB", (w, h), (10, 200, 30)) for w, h in [(1, 1), (5, 900), (900, 5), (224, 224), (225, 223)]]
    for img in [Image.open(p) for p in paths] + odd:
        img.load()
        assert np.array_equal(np.asarray(fast(img)), np.asarray(reference(img))), (img.size, img.mode)


@pytest.mark.parametrize("resize_mode, size", [("longest", 64), ("squash", 64), ("shortest", [64, 96])])
def test_other_modes_use_open_clip_transform(tmp_path, resize_mode, size):
    cfg = cfg_json(size=size, resize_mode=resize_mode)
    path = mixed_images(tmp_path, n=1)[0]
    pixels, width, height = decode_image(path.read_bytes(), cfg)
    pre = image_transform_v2(PreprocessCfg(**json.loads(cfg)), is_train=False)
    expected = (pre(Image.open(path)) * 0.5 + 0.5).mul(255).round().byte().permute(1, 2, 0).numpy()
    assert pixels.shape == expected.shape
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1


def test_exif_rotation_applied_and_size_reported(tmp_path):
    img = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3)))  # 200 wide, 100 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(img, "JPEG", exif=exif, quality=95)
    pixels, width, height = decode_image(data, cfg_json(size=64))
    assert (width, height) == (100, 200)
    # After rotation the gradient runs top to bottom, so columns are constant and rows vary.
    assert np.abs(np.diff(pixels[:, :, 0].astype(int), axis=1)).mean() < 0.5
    assert np.abs(np.diff(pixels[:, :, 0].astype(int), axis=0)).mean() > 1


def test_jpeg_draft_is_close_and_keeps_original_size(tmp_path):
    path = mixed_images(tmp_path, n=5)[4]  # 640x480 JPEG
    full, w1, h1 = decode_image(path.read_bytes(), cfg_json(size=224))
    draft, w2, h2 = decode_image(path.read_bytes(), cfg_json(size=224), jpeg_draft=True)
    assert (w1, h1) == (w2, h2) == (640, 480)
    assert full.shape == draft.shape
    assert np.abs(full.astype(int) - draft.astype(int)).mean() < 6


@pytest.mark.parametrize("kind", ["16-bit PNG", "palette with transparency", "animated GIF", "animated WebP",
                                  "LA", "1-bit"])
def test_unusual_modes_decode_to_rgb(kind):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    if kind == "16-bit PNG":
        data = encode(Image.fromarray((np.arange(2400).reshape(40, 60) * 20).astype(np.uint16)), "PNG")
    elif kind == "palette with transparency":
        pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        data = encode(pal, "PNG", transparency=0)
    elif kind.startswith("animated"):
        frames = [base, base.rotate(90), base.rotate(180)]
        fmt = "GIF" if "GIF" in kind else "WEBP"
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
    elif kind == "LA":
        data = encode(base.convert("LA"), "PNG")
    else:
        data = encode(base.convert("1"), "PNG")
    pixels, width, height = decode_image(data, cfg_json(size=32))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8 and (width, height) == (60, 40)


def _reference_pixels(data: bytes, cfg: str) -> np.ndarray:
    """open_clip's own eval transform on PIL, as uint8 HWC (exactly what the PIL path gives)."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return np.asarray(_open_clip_geometry(PreprocessCfg(**json.loads(cfg)))(img))


@pytest.mark.parametrize("size, interpolation", [(224, "bicubic"), (64, "bicubic"), (336, "bilinear")])
def test_default_decode_is_within_two_levels_of_open_clip(tmp_path, size, interpolation):
    """RGB and greyscale images (JPEG by torchvision, others by PIL) are resized by torch: pixels
    within two levels of open_clip's PIL transform (torch's own bound; most are equal, a few
    upscaled ones differ by 2), other modes take PIL's path exactly."""
    cfg = cfg_json(size=size, interpolation=interpolation)
    odd = [encode(Image.new("RGB", (w, h), (10, 200, 30)), "JPEG", quality=95)
           for w, h in [(1, 1), (5, 900), (900, 5), (224, 224), (225, 223)]]
    progressive = encode(Image.open(mixed_images(tmp_path / "p", n=5)[4]), "JPEG", progressive=True, quality=90)
    for data in [p.read_bytes() for p in mixed_images(tmp_path, n=20)] + odd + [progressive]:
        pixels, _, _ = decode_image(data, cfg)
        expected = _reference_pixels(data, cfg)
        assert pixels.shape == expected.shape
        diff = np.abs(pixels.astype(int) - expected.astype(int))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.05, Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pil(orientation):
    rng = np.random.default_rng(orientation)
    img = Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).resize((160, 96))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", exif=exif, quality=95)
    cfg = cfg_json(size=64)
    pixels, _, _ = decode_image(data, cfg)
    assert np.abs(pixels.astype(int) - _reference_pixels(data, cfg).astype(int)).max() <= 1
