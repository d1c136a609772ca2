"""``input.decode: gpu``: baseline JPEGs decoded on the encoder's device, the rest on CPU as usual.

The decode stage reads each image's header only and passes a baseline RGB or
greyscale JPEG on as its bytes (smaller than its pixels) with its EXIF
orientation; everything else (PNG and other formats, CMYK, progressive JPEGs)
it decodes on CPU as always and passes as raw pixels. The encoder actor then
decodes the JPEGs in one batched call (nvJPEG through torchvision's
``decode_jpeg(..., device="cuda")``; on a CPU device the same call runs
libjpeg-turbo, which is how the tests cover this path), turns them upright,
resizes and crops them there with the same torch kernels as the CPU path. A file
the batched call rejects is tried alone, then by the CPU decode; what none can
read becomes an error row with the CPU decode's message.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from clipbatch.errors import UserError
from clipbatch.pipeline.decode import FAILED_SIZE, decode_all, decode_configs, decode_image, read_header, \
    tensor_transform
from clipbatch.pipeline.rows import NO_ERROR, batch_contents, for_each_image, image_error

ORIENTATION = 0x0112  # the EXIF tag

def on_device(decode: str, preprocess: list[dict]) -> bool:
    """Whether a job decodes JPEGs on the encoder's device: input.decode gpu; auto stays on CPU until GPU
    decode has been measured faster within the parity bar on a GPU (docs/performance.md)."""
    if decode != "gpu":
        return False
    configs = decode_configs(preprocess)
    if len(configs) > 1 or tensor_transform(json.dumps(configs[0])) is None:
        raise UserError("input.decode: gpu needs every model of the job to take the same square, shortest-edge, "
                        "bicubic or bilinear preprocess; use input.decode: cpu")
    return True


def takes(img: Image.Image) -> bool:
    """Whether the device decodes this image (opened, not decoded): baseline RGB or greyscale JPEGs;
    progressive ones would take nvJPEG's slow path, CMYK ones it cannot convert."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and not img.info.get("progressive") \
        and not img.info.get("progression")


def read_for_device(batch: dict[str, np.ndarray], preprocess_cfg_json: str, storage_options: dict,
                    max_pixels: int | None = None) -> dict[str, np.ndarray]:
    """The decode stage's UDF with input.decode: gpu: {id, source[, data, error]} -> the same with width,
    height, error, jpeg (a baseline JPEG's bytes, for the device), orientation, pixels_raw (the pixels
    of any other image, decoded here)."""
    n = len(batch["id"])
    contents, errors = batch_contents(batch, storage_options)
    jpegs, raws = np.full(n, b"", dtype=object), np.full(n, b"", dtype=object)
    orientations = np.ones(n, dtype=np.int8)
    widths, heights = np.full(n, FAILED_SIZE, dtype=np.int32), np.full(n, FAILED_SIZE, dtype=np.int32)

    def sort_out(i: int, data: bytes) -> None:
        img, widths[i], heights[i] = read_header(data, max_pixels)
        with img:
            if takes(img):
                jpegs[i], orientations[i] = data, int(img.getexif().get(ORIENTATION) or 1)
                return
        (pixels,), _, _ = decode_all(data, [preprocess_cfg_json], False, 0, max_pixels)
        raws[i] = pixels.tobytes()

    for_each_image(contents, errors, sort_out)
    passed = {k: v for k, v in batch.items() if k not in ("data", "error")}
    return {**passed, "width": widths, "height": heights, "error": errors, "jpeg": jpegs,
            "orientation": orientations, "pixels_raw": raws}


def upright(chw, orientation: int):
    """A CHW tensor turned as PIL's ImageOps.exif_transpose turns the image (EXIF orientations 1-8)."""
    import torch

    turns = {2: lambda t: t.flip(2), 3: lambda t: t.flip(1, 2), 4: lambda t: t.flip(1),
             5: lambda t: t.transpose(1, 2), 6: lambda t: torch.rot90(t, -1, (1, 2)),
             7: lambda t: t.flip(1, 2).transpose(1, 2), 8: lambda t: torch.rot90(t, 1, (1, 2))}
    return turns[orientation](chw) if orientation in turns else chw


def _decode_jpegs(datas: list[bytes], device: str) -> list:
    """CHW uint8 tensors on the device, None for a file the decoder rejects: one batched call, and
    one call per image only if the batch fails (the batched call returns nothing on an error)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if not tensors:
        return []
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded = []
        for t in tensors:
            try:
                decoded.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def device_pixels(jpegs, orientations, raws, cfg_json: str, size: tuple[int, int], device: str,
                  errors: np.ndarray):
    """The batch's pixels as one uint8 [n, H, W, 3] tensor on the device; rows that fail get their
    error set in ``errors`` (rows that already have one are left blank)."""
    import torch

    transform = tensor_transform(cfg_json)
    out = torch.zeros((len(errors), *size, 3), dtype=torch.uint8, device=device)
    on_device = [i for i in range(len(errors)) if errors[i] == NO_ERROR and jpegs[i]]
    for i, chw in zip(on_device, _decode_jpegs([jpegs[i] for i in on_device], device)):
        try:
            if chw is None:  # rejected by the device's decoder: the CPU decode, or its error
                out[i] = torch.from_numpy(decode_image(jpegs[i], cfg_json)[0]).to(device)
            else:
                out[i] = transform(upright(chw, int(orientations[i])))
        except Exception as exc:
            errors[i] = image_error(exc)
    for i in range(len(errors)):
        if errors[i] == NO_ERROR and not jpegs[i]:  # decoded on CPU by the decode stage
            out[i] = torch.from_numpy(np.frombuffer(raws[i], np.uint8).reshape(*size, 3)).to(device)
    return out
