"""Shared fixtures: small real models, real images, a real local Ray and a real S3 server."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import helpers  # noqa: E402
import s3server  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test S3 server's identity, in the environment from the start: Ray workers inherit the
# environment of the moment Ray starts, exactly as they do for a user's `clipbatch run`.
os.environ.update(s3server.CREDENTIALS)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return "local-dir:" + str(helpers.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture(scope="session")
def siglip_model(tmp_path_factory) -> str:
    return "local-dir:" + str(helpers.make_tiny_model(tmp_path_factory.mktemp("models") / "siglip", seed=1,
                                                      siglip=True))


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    helpers.mixed_images(folder, n=24)
    return folder


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """SeaweedFS on free loopback ports; it accepts the credentials in s3server.CREDENTIALS only."""
    server = s3server.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


CLASSES = ["cat", "dog", "car", "tree", "house"]  # spec_dict's labels (library_spec's, which test_parity checks)
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def spec_dict(images_path, model_name: str, out_path, **sections) -> dict:
    spec = {"name": "test", "input": {"path": str(images_path)}, "model": {"name": model_name},
            "labels": {"classes": list(CLASSES), "templates": list(TEMPLATES)},
            "output": {"path": str(out_path)}}
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def library_spec(images_path, model_name: str, out_path) -> dict:
    """The job test_parity checks against open_clip's reference (fp32, float32 embeddings)."""
    return spec_dict(images_path, model_name, out_path, model={"precision": "fp32"},
                     output={"embedding_dtype": "float32"})


@pytest.fixture(scope="session")
def library_run(tmp_path_factory, images, ray_local):
    """clipbatch.run() of library_spec on the mixed images in the tests' Ray, once per model: the
    parity test compares it with open_clip, other tests compare their own runs of it with it."""
    import clipbatch

    runs = {}

    def run(model_name: str):
        if model_name not in runs:
            out = tmp_path_factory.mktemp("library") / "out"
            runs[model_name] = clipbatch.run(library_spec(images, model_name, out)), out
        return runs[model_name]
    return run


@pytest.fixture(scope="session")
def pets_bucket(s3, images):
    """The mixed images on the S3 server, at s3://pets/images; yields an s3fs filesystem."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, skip_instance_cache=True)
    fs.mkdir("pets")
    fs.put(str(images) + "/", "pets/images/", recursive=True)
    return fs


def s3_library_spec(s3, model_name: str, out: str = "s3://pets/out") -> dict:
    """library_spec with its images (pets_bucket) and its output on S3."""
    spec = library_spec("s3://pets/images", model_name, out)
    spec["input"]["storage_options"] = spec["output"]["storage_options"] = {"endpoint_url": s3.endpoint}
    return spec


@pytest.fixture(scope="session")
def s3_library_run(s3, pets_bucket, tiny_model, ray_local):
    """s3_library_spec with the tiny model into s3://pets/out, once a session (S3 round trip, relabel on S3)."""
    import clipbatch

    return clipbatch.run(s3_library_spec(s3, tiny_model))


def broken_files(good_jpeg: bytes) -> dict[str, bytes]:
    """More files that must each become one error row: a PDF named .webp, a PNG cut short, random
    bytes, a format Pillow cannot read, and a decompression bomb (over the tests' max_pixels)."""
    import io
    import zlib

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(png, format="PNG")
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, format="PNG")  # 16M pixels, a few KB of PNG
    rng = np.random.default_rng(7)
    return {"document.webp": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n",
            "cut.png": png.getvalue()[: len(png.getvalue()) // 2],
            "random.jpg": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
            "photo.heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00" + zlib.compress(b"x" * 100),
            "bomb.png": bomb.getvalue()}


@pytest.fixture(scope="session")
def broken_images(images, tmp_path_factory):
    """The mixed images plus files that cannot be decoded."""
    folder = tmp_path_factory.mktemp("broken")
    shutil.copytree(images, folder, dirs_exist_ok=True)
    good = next(images.rglob("*.jpg")).read_bytes()
    (folder / "bad").mkdir()
    (folder / "bad" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "bad" / "empty.png").write_bytes(b"")
    (folder / "bad" / "text.jpg").write_bytes(b"this is not an image at all")
    (folder / "bad" / "noise.webp").write_bytes(bytes(range(256)) * 8)
    (folder / "bad" / "name with [brackets] & spaces.jpg").write_bytes(good)
    for name, data in broken_files(good).items():
        (folder / "bad" / name).write_bytes(data)
    return folder


def broken_spec(images, model, out, **sections):
    inputs = {"max_pixels": 10_000_000, **sections.pop("input", {})}
    return spec_dict(images, model, out, input=inputs, **sections)
