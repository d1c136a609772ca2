"""`clipbatch report`: one self-contained HTML page, for an output on S3 and locally, checked in a
real headless Chromium where one is installed."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

import clipbatch
from clipbatch.cli import main
from clipbatch.commands import demo_world as world
from clipbatch.commands.demo import write_images
from clipbatch.commands.report import NO_LABEL, aspect_class, build_report, error_reason
from helpers import chromium_dom, mixed_images

IMG_SRC = re.compile(r"<img src='([^']*)'")


def test_error_reason_and_aspect_by_hand():
    assert error_reason("UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x7f3a>") == \
        "UnidentifiedImageError: cannot identify image file …"
    assert error_reason("ValueError: 4000x4000 = 16,000,000 pixels is over input.max_pixels (10,000,000)") == \
        "ValueError: # = # pixels is over input.max_pixels (#)"
    assert error_reason("OSError: cannot read 's3://b/x 1.jpg'") == "OSError: cannot read …"
    w = np.array([640, 480, 1920, 1000, 300, 1009])
    h = np.array([480, 640, 1080, 1000, 200, 1000])
    assert aspect_class(w, h) == ["4:3", "3:4", "16:9", "1:1", "3:2", "1:1"]
    assert aspect_class(np.array([1050]), np.array([1000])) == ["other"]


@pytest.fixture(scope="module")
def reported(s3, tmp_path_factory, ray_local):
    """A job with images and output on S3 (36 demo pictures, 12 mixed photos, 2 broken files),
    its report written on S3, and a local copy of the output reported locally."""
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    write_images(images, 36, world.DEMO_SEED)
    mixed_images(images / "photos", n=12)
    (images / "bad").mkdir()
    (images / "bad" / "empty.png").write_bytes(b"")
    (images / "bad" / "text.jpg").write_bytes(b"not an image")
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, skip_instance_cache=True)
    fs.mkdir("reports")
    fs.put(str(images) + "/", "reports/images/", recursive=True)
    options = {"endpoint_url": s3.endpoint}
    spec = {"input": {"path": "s3://reports/images", "storage_options": options}, "model": {"name": "clipbatch-demo"},
            "labels": {"classes": list(world.CLASSES), "templates": list(world.DEMO_TEMPLATES), "min_score": 0.6},
            "output": {"path": "s3://reports/out", "storage_options": options}}
    assert clipbatch.run(spec).complete
    assert main(["report", "s3://reports/out", "--storage-option", f"endpoint_url={s3.endpoint}"]) == 0
    remote_page = fs.cat_file("reports/out/_report/index.html").decode()
    local = root / "out"
    fs.get("reports/out/", str(local) + "/", recursive=True)
    shutil.rmtree(local / "_report")
    page_path = build_report(str(local), options)
    return local, remote_page, (local / "_report" / "index.html").read_text(), page_path


def test_page_is_self_contained_and_complete(reported):
    local, remote_page, page, page_path = reported
    assert page_path == f"{local}/_report/index.html"
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page), "the page must load nothing from outside"
    assert "<link" not in page and "<script src" not in page
    sources = IMG_SRC.findall(page)
    charts = [s for s in sources if s.startswith("data:image/png")]
    thumbs = [s for s in sources if s.startswith("data:image/jpeg")]
    assert len(sources) == len(charts) + len(thumbs) and len(charts) == 7  # with errors: 7 charts
    for uri in sources:
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
            img.load()
            assert img.width > 10 and img.height > 10
    assert "no preview" not in page  # every chosen image was read back from S3 for its thumbnail
    for title in ("Class distribution", "Mean confidence per class", "Confidence", "Image sizes", "Aspect ratio",
                  "Common aspect ratios", "Errors by reason", "lowest confidence"):
        assert title in page
    # the same page, whether the output was on S3 or local (apart from its path and time stamp)
    assert len(IMG_SRC.findall(remote_page)) == len(sources)
    assert "s3://reports/out" in remote_page


def test_page_numbers_match_the_output(reported):
    local, _, page, _ = reported
    table = pq.read_table(local).to_pylist()
    ok = [r for r in table if r["error"] is None]
    assert f"<tr><th>rows</th><td>{len(table)}</td></tr>" in page
    assert f"<tr><th>errors</th><td>{len(table) - len(ok)}</td></tr>" in page
    reasons = Counter(error_reason(r["error"]) for r in table if r["error"] is not None)
    assert reasons == {"ValueError: empty file": 1,  # error rows carry no buffer address (decode.image_error)
                       "UnidentifiedImageError: cannot identify image file": 1}, reasons
    for reason, n in reasons.items():
        assert f"<tr><td>{n}</td><td>{reason}</td></tr>" in page
    # galleries: the least confident images, then each class's most confident ones
    lowest = sorted(ok, key=lambda r: r["score"])[:16]
    gallery = page.split("<h2>lowest confidence</h2>", 1)[1].split("</div>", 1)[0]
    for r in lowest:
        assert f"{r['score']:.3f}<br>{r['id']}" in gallery
    unlabeled = [r for r in ok if r["label"] is None]
    assert unlabeled and all(r["score"] < 0.6 for r in unlabeled)
    assert NO_LABEL in gallery
    best_red_circle = max((r for r in ok if r["label"] == "red circle"), key=lambda r: r["score"])
    section = page.split("<h2>most confident: red circle</h2>", 1)[1].split("</div>", 1)[0]
    assert f"{best_red_circle['score']:.3f}<br>{best_red_circle['id']}" in section


@pytest.mark.skipif(not shutil.which("chromium"), reason="Chromium is not installed (CI installs it)")
def test_page_in_headless_chromium(reported, tmp_path):
    """Every chart and thumbnail decodes in a real browser (the page counts them on load), and the
    page renders to a screenshot that is not blank."""
    local, _, page, _ = reported
    url = (local / "_report" / "index.html").as_uri()
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    dom = chromium_dom(url)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-images="{len(IMG_SRC.findall(page))}"' in body and 'data-broken="0"' in body, body
    shot = tmp_path / "report.png"
    subprocess.run([*common, "--hide-scrollbars", "--window-size=1400,2400", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.shape == (2400, 1400) and pixels.std() > 20
