"""WebDataset and Parquet shard inputs end to end: ids, carried columns, damaged shards, resume, S3."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

import clipbatch
from conftest import spec_dict
from helpers import mixed_images


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def webdataset(tmp_path_factory):
    """img2dataset's layout: {00000..00002}.tar with <key>.<image ext>, <key>.txt, <key>.json;
    shard 00002 is cut short, 00003 is missing, and one sample has no image."""
    folder = tmp_path_factory.mktemp("wds")
    images = mixed_images(tmp_path_factory.mktemp("wds-src"), n=18)
    for shard in range(3):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, path in enumerate(images[shard * 6:(shard + 1) * 6]):
                key = f"{shard:05d}{i:04d}"
                _add(tar, f"{key}{path.suffix}", path.read_bytes())
                _add(tar, f"{key}.txt", f"caption {key}".encode())
                _add(tar, f"{key}.json", json.dumps({"url": f"http://example.com/{key}", "width": 10}).encode())
            if shard == 0:
                _add(tar, "0000099.json", json.dumps({"url": "http://example.com/failed"}).encode())
        data = buf.getvalue()
        (folder / f"{shard:05d}.tar").write_bytes(data if shard != 2 else data[: len(data) // 2])
    return folder


def test_webdataset_end_to_end(webdataset, tiny_model, tmp_path, ray_local):
    spec = spec_dict(str(webdataset / "{00000..00003}.tar"), tiny_model, tmp_path / "out",
                     input={"keep": ["txt", "json.url"]})
    summary = clipbatch.run(spec)
    assert summary.complete
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    good = [r for r in rows.values() if r["error"] is None]
    assert len([i for i in rows if i.startswith("00000/")]) == 7  # 6 samples + the one without an image
    assert len([r for r in good if r["id"].startswith(("00000/", "00001/"))]) == 12
    assert 0 < len([r for r in good if r["id"].startswith("00002/")]) < 6  # what was readable before the cut
    assert "unreadable shard" in rows["00002#error"]["error"]
    assert "FileNotFoundError" in rows["00003#error"]["error"]
    assert "no image member" in rows["00000/0000099"]["error"]
    sample = rows["00001/000010002"]
    assert sample["txt"] == "caption 000010002" and sample["json_url"] == "http://example.com/000010002"
    assert sample["source"] == str(webdataset / "00001.tar") and sample["label"] is not None
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["format"] == "webdataset" and manifest["counts"]["shards"] == 4
    assert manifest["counts"]["errors"] == summary.errors == 3
    assert_thumbnails_read_back(rows, manifest)

    # Resume: lose one part, rerun: the missing rows come back exactly once, the rest is skipped.
    # A run killed after its last part but before _SUCCESS: the rerun reads no shard again,
    # since every shard's recorded row count is reached by its rows in the output.
    records = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "_shards").glob("*.json")}
    assert len(records) == 4  # every shard, the missing one too (its one error row)
    (tmp_path / "out" / "_SUCCESS").unlink()
    again = clipbatch.run(spec)
    assert again.complete and again.new_rows == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "_shards").glob("*.json")} == records

    # Resume: lose one part, rerun: the missing rows come back exactly once, the rest is skipped.
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    (tmp_path / "out" / "_SUCCESS").unlink()
    lost = pq.read_table(parts[0]).num_rows
    parts[0].unlink()
    again = clipbatch.run(spec)
    assert again.complete and again.new_rows == lost
    ids = pq.read_table(tmp_path / "out", columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(rows)
    assert clipbatch.run(spec).skipped


def test_parquet_end_to_end(tmp_path, images, tiny_model, ray_local):
    files = sorted(images.rglob("*.png"))
    for shard in range(2):
        chunk = files[shard * 3:(shard + 1) * 3]
        table = pa.table({"key": [f"k{shard}-{i}" for i in range(len(chunk))] + [f"k{shard}-null"],
                          "image": [p.read_bytes() for p in chunk] + [None],
                          "caption": [f"cap {p.name}" for p in chunk] + [None]})
        pq.write_table(table, tmp_path / f"shard-{shard}.parquet")
    (tmp_path / "shard-2.parquet").write_bytes(b"PAR1 this is not parquet")
    spec = spec_dict(str(tmp_path / "*.parquet"), tiny_model, tmp_path / "out",
                     input={"format": "parquet", "id_column": "key", "keep": ["caption"]})
    summary = clipbatch.run(spec)
    assert summary.complete and summary.rows == 9 and summary.errors == 3
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert rows["k0-1"]["caption"] == f"cap {files[1].name}" and rows["k0-1"]["error"] is None
    assert "no image bytes" in rows["k1-null"]["error"]
    assert "unreadable shard" in rows["shard-2.parquet#error"]["error"]
    assert_thumbnails_read_back(rows, json.loads((tmp_path / "out" / "_manifest.json").read_text()))


def assert_thumbnails_read_back(rows: dict, manifest: dict) -> None:
    """Gallery pages (search --html) find every decodable row's image inside its shard again."""
    from clipbatch.commands.gallery import thumbnails

    found = thumbnails(list(rows.values()), manifest)
    assert set(found) == set(rows)
    for row_id, row in rows.items():
        assert (found[row_id] is not None) == (row["error"] is None), row_id


def test_webdataset_on_s3(s3, webdataset, tiny_model, ray_local):
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, skip_instance_cache=True)
    fs.mkdir("shards")
    for shard in ("00000.tar", "00001.tar"):
        fs.put_file(str(webdataset / shard), f"shards/wds/{shard}")
    opts = {"endpoint_url": s3.endpoint}
    spec = spec_dict("s3://shards/wds/{00000..00001}.tar", tiny_model, "s3://shards/out",
                     input={"storage_options": opts, "keep": ["txt"]}, output={"storage_options": opts})
    summary = clipbatch.run(spec)
    assert summary.complete and summary.rows == 13 and summary.errors == 1
    table = pq.read_table("shards/out", filesystem=fs)
    assert set(table["source"].to_pylist()) == {"s3://shards/wds/00000.tar", "s3://shards/wds/00001.tar"}
