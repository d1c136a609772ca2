"""input.decode: gpu on the CPU device: the same code path as on a GPU (torchvision's batched
decode_jpeg runs libjpeg-turbo there), checked against the CPU decode image by image."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from clipbatch.pipeline.decode import decode_image, read_and_decode
from clipbatch.pipeline.rows import NO_ERROR
from clipbatch.pipeline.device_decode import device_pixels, read_for_device
from helpers import encode
from test_encoder import CLASSES, embeddings, encoder, heads  # noqa: F401  (heads is a fixture)

CFG = json.dumps({"size": 64, "mode": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                  "resize_mode": "shortest", "fill_color": 0})


def _batch(folder):
    sources = np.array(sorted(str(p) for p in folder.rglob("*") if p.is_file()), dtype=object)
    return {"id": sources, "source": sources}


def test_baseline_jpegs_go_to_the_device_and_the_rest_are_decoded_here(broken_images):
    batch = _batch(broken_images)
    for_device, on_cpu = read_for_device(batch, CFG, {}), read_and_decode(batch, CFG, {})
    for source, jpeg, raw, error, cpu_error in zip(batch["source"], for_device["jpeg"], for_device["pixels_raw"],
                                                   for_device["error"], on_cpu["error"]):
        try:
            img = Image.open(source)
        except Exception:
            img = None
        baseline = img is not None and img.format == "JPEG" and img.mode in ("RGB", "L")
        assert bool(jpeg) == baseline and bool(raw) == (error == NO_ERROR and not baseline), source
        if not baseline:  # decided here, with the CPU decode's message; JPEGs are decided on the device
            assert error == cpu_error, source


def test_device_pixels_match_the_cpu_decode(broken_images, tmp_path):
    folder = tmp_path / "images"  # a copy: the session's broken images are shared with other tests
    shutil.copytree(broken_images, folder)
    good = next(folder.rglob("*.jpg")).read_bytes()
    for orientation in (3, 6, 8):  # upright as the CPU decode makes them
        exif = Image.Exif()
        exif[0x0112] = orientation
        name = folder / "bad" / f"turned{orientation}.jpg"
        name.write_bytes(encode(Image.open(io.BytesIO(good)), "JPEG", exif=exif, quality=95))
    progressive = folder / "bad" / "progressive.jpg"
    progressive.write_bytes(encode(Image.open(io.BytesIO(good)), "JPEG", progressive=True))
    batch = _batch(folder)
    cols = read_for_device(batch, CFG, {})
    errors = cols["error"].copy()
    pixels = device_pixels(cols["jpeg"], cols["orientation"], cols["pixels_raw"], CFG, (64, 64), "cpu", errors)
    expected = read_and_decode(batch, CFG, {})
    assert list(errors) == list(expected["error"])
    ok = errors == NO_ERROR
    diff = np.abs(pixels.numpy()[ok].astype(int) - expected["pixels"][ok].astype(int))
    assert diff.max() <= 1 and ok.sum() >= 20 and cols["jpeg"][ok].astype(bool).sum() >= 8


def test_a_jpeg_the_device_rejects_falls_back_to_the_cpu_decode(broken_images):
    good = next(broken_images.rglob("*.jpg")).read_bytes()
    truncated = good[: len(good) // 2]  # the header reads, the device's strict decoder refuses the data
    errors = np.array([NO_ERROR, NO_ERROR], dtype=object)
    pixels = device_pixels(np.array([good, truncated], dtype=object), np.ones(2, np.int8),
                           np.array([b"", b""], dtype=object), CFG, (64, 64), "cpu", errors)
    try:
        expected_error, expected = NO_ERROR, decode_image(truncated, CFG)[0]
    except Exception as exc:
        expected_error, expected = str(exc), None
    assert errors[0] == NO_ERROR and (errors[1] == NO_ERROR) == (expected_error == NO_ERROR)
    if expected is not None:
        assert np.abs(pixels[1].numpy().astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("precision", ["fp32"])
def test_the_encoder_labels_device_decoded_batches_as_cpu_decoded_ones(heads, images, precision):  # noqa: F811
    members, _ = heads
    cfg = json.dumps(members[0].load("cpu").preprocess_cfg)
    batch = _batch(images)
    on_cpu = encoder(heads)(read_and_decode(batch, cfg, {}))
    on_device = encoder(heads)(read_for_device(batch, cfg, {}))
    assert on_device["label"].to_pylist() == on_cpu["label"].to_pylist()
    a, b = embeddings(on_cpu), embeddings(on_device)
    assert ((a * b).sum(1) >= 0.999).all()
    assert np.abs(np.stack(on_cpu["scores"].to_numpy(zero_copy_only=False)) -
                  np.stack(on_device["scores"].to_numpy(zero_copy_only=False))).max() < 5e-3
