"""Decode geometry is open_clip's, pixel for pixel; odd image modes decode to RGB."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from clipbatch.decode import _geometric_transform, _open_clip_geometry, decode_image
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
