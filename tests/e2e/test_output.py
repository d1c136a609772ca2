"""The output contract, read back the way users read it (DuckDB, pyarrow); bad images; resume."""

from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import clipbatch
from clipbatch.errors import UserError
from clipbatch.output.schema import read_metadata
from conftest import CLASSES, broken_spec, spec_dict


@pytest.fixture(scope="module")
def finished(broken_images, tiny_model, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = clipbatch.run(broken_spec(broken_images, tiny_model, out, labels={"top_k": 3}))
    return out, summary


def test_summary_and_files(finished):
    out, summary = finished
    assert summary.complete and summary.rows == 34 and summary.errors == 9 and summary.device == "cpu"
    names = sorted(p.name for p in out.iterdir())
    assert names[-2:] == ["_SUCCESS", "_manifest.json"] or set(names) >= {"_SUCCESS", "_manifest.json"}
    assert not [n for n in names if n.endswith(".tmp")]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 34, "rows": 34, "errors": 9, "new_rows": 34}
    (model,) = manifest["models"]  # one model: a list of one
    assert manifest["classes"] == CLASSES and model["model"].startswith("local-dir:") and manifest["clipbatch_version"]
    assert model["logit_scale"] == pytest.approx(30.0, rel=1e-4) and model["embedding_column"] == "embedding"
    assert (model["precision"], model["weight"], model["embedding_dim"]) == ("fp32", 1.0, 64)
    # 2 CPUs: one actor running two batches at once, one thread each
    assert (manifest["compute"]["max_actors"], manifest["compute"]["concurrent_batches"]) == (1, 2)
    assert set(manifest["timings"]) == {"total_s"} and manifest["timings"]["total_s"] > 0


def test_progress_never_shows_more_than_the_total():
    """Batches Ray runs again after losing a node are counted again (seen: 2,016 of 2,000 in the
    multi-node test); the line a user reads stops at the total."""
    import io

    from clipbatch.pipeline.progress import ProgressReporter

    log = io.StringIO()
    with ProgressReporter(lambda: (2016, 2010), 2000, interval=60, stream=log):
        pass
    assert log.getvalue().startswith("clipbatch: 2,000/2,000 images (100.0%),")
    assert ", 2,000 errors," in log.getvalue()


def test_duckdb_reads_output(finished):
    out, _ = finished
    con = duckdb.connect()
    rows, ids, n_scores, n_dims = con.execute(
        f"SELECT count(*), count(DISTINCT id), min(len(scores)), min(len(embedding)) "
        f"FROM read_parquet('{out}/part-*.parquet') WHERE error IS NULL").fetchone()
    assert rows == ids == 25 and n_scores == 5 and n_dims == 64
    top = con.execute(f"SELECT label, count(*) FROM read_parquet('{out}/*.parquet') "
                      f"WHERE error IS NULL GROUP BY label").fetchall()
    assert {label for label, _ in top} <= set(CLASSES)


def test_schema_and_metadata(finished):
    out, _ = finished
    parts = sorted(out.glob("part-*.parquet"))
    schema = pq.read_schema(parts[0])
    assert schema.names == ["id", "source", "width", "height", "label", "score", "top_labels", "top_scores",
                            "scores", "embedding", "error"]
    assert schema.field("scores").type == pa.list_(pa.float32(), 5)
    assert schema.field("embedding").type == pa.list_(pa.float16(), 64)
    assert schema.field("width").type == pa.int32()
    meta = read_metadata(schema)
    assert meta["classes"] == CLASSES and meta["templates"] == ["a photo of a {}.", "a drawing of a {}."]
    assert [m["embedding_column"] for m in meta["models"]] == ["embedding"] and "fingerprint" in meta
    column_encodings = {}
    rg = pq.ParquetFile(parts[0]).metadata.row_group(0)
    for i in range(rg.num_columns):
        column_encodings[rg.column(i).path_in_schema.split(".")[0]] = rg.column(i).encodings
    for name in ("scores", "embedding"):
        assert not any("DICTIONARY" in e for e in column_encodings[name]), column_encodings[name]


def test_rows_ids_and_errors(finished, broken_images):
    out, _ = finished
    table = pq.read_table(out)
    rows = {r["id"]: r for r in table.to_pylist()}
    on_disk = {str(p.relative_to(broken_images)) for p in broken_images.rglob("*") if p.is_file()}
    assert set(rows) == on_disk
    for name in ("bad/truncated.jpg", "bad/empty.png", "bad/text.jpg", "bad/noise.webp", "bad/bomb.png"):
        row = rows[name]
        assert row["error"] and row["label"] is None and row["scores"] is None and row["width"] is None
        assert row["source"] == str(broken_images / name)
    assert "empty file" in rows["bad/empty.png"]["error"]
    for name in ("document.webp", "cut.png", "random.jpg", "photo.heic", "bomb.png"):
        row = rows[f"bad/{name}"]
        assert row["error"] and len(row["error"]) < 300 and row["label"] is None, (name, row["error"])
    assert "over input.max_pixels" in rows["bad/bomb.png"]["error"]
    assert "cannot identify image file" in rows["bad/document.webp"]["error"]
    good = rows["bad/name with [brackets] & spaces.jpg"]
    assert good["error"] is None and good["label"] in CLASSES
    ok = rows["group0/img000.jpg"]
    assert (ok["width"], ok["height"]) == (97, 61)
    assert ok["top_labels"][0] == ok["label"] and len(ok["top_labels"]) == 3
    assert ok["top_scores"] == sorted(ok["top_scores"], reverse=True)
    assert sum(ok["scores"]) == pytest.approx(1.0, abs=1e-4)
    assert ok["score"] == pytest.approx(max(ok["scores"]), abs=1e-6)


def test_rerun_of_finished_job_does_nothing(finished, broken_images, tiny_model):
    out, _ = finished
    before = sorted(p.name for p in out.glob("part-*"))
    summary = clipbatch.run(broken_spec(broken_images, tiny_model, out, labels={"top_k": 3}))
    assert summary.skipped and summary.new_rows == 0 and summary.rows == 34
    assert sorted(p.name for p in out.glob("part-*")) == before


def test_resume_finishes_only_missing_rows(finished, broken_images, tiny_model, tmp_path):
    out, _ = finished
    partial = tmp_path / "partial"
    partial.mkdir()
    full = pq.read_table(sorted(out.glob("part-*.parquet"))[0])
    pq.write_table(full.slice(0, 10), partial / "part-00000-crashed.parquet")  # as if killed after one part
    summary = clipbatch.run(broken_spec(broken_images, tiny_model, partial, labels={"top_k": 3}))
    assert summary.complete and summary.new_rows == 24 and summary.rows == 34
    ids = pq.read_table(partial, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 34 and (partial / "_SUCCESS").exists()


def test_resume_refuses_different_classes(finished, broken_images, tiny_model, tmp_path):
    out, _ = finished
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    (mixed / "_SUCCESS").unlink()
    with pytest.raises(UserError, match="different classes"):
        clipbatch.run(broken_spec(broken_images, tiny_model, mixed, labels={"classes": ["x", "y"], "top_k": 3}))


def test_mode_error_and_overwrite(finished, broken_images, tiny_model, tmp_path):
    out, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(UserError, match="already holds output"):
        clipbatch.run(broken_spec(broken_images, tiny_model, copy, output={"mode": "error"}))
    summary = clipbatch.run(broken_spec(broken_images, tiny_model, copy, output={"mode": "overwrite"},
                                      labels={"classes": ["x", "y"]}))
    assert summary.complete and summary.new_rows == 34
    assert pq.read_table(copy)["label"].drop_null().unique().to_pylist() != []


def test_a_listing_of_missing_folder_and_dangling_uris_gives_error_rows(images, tiny_model, tmp_path, ray_local):
    """A .txt listing whose URIs do not exist, name a folder, or are a link to nothing: one error row
    each beside the good rows, and the job completes."""
    good = sorted(str(p) for p in images.rglob("*.png"))[:2]
    (tmp_path / "a-folder.jpg").mkdir()
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    bad = [str(tmp_path / "missing.jpg"), str(tmp_path / "a-folder.jpg"), str(tmp_path / "dangling.jpg")]
    listing = tmp_path / "uris.txt"
    listing.write_text("\n".join(good + bad) + "\n")
    summary = clipbatch.run(spec_dict(listing, tiny_model, tmp_path / "out"))
    assert summary.complete and summary.rows == 5 and summary.errors == 3
    rows = {r["source"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert all(rows[s]["error"] is None and rows[s]["label"] for s in good)
    assert all(rows[s]["error"] and rows[s]["label"] is None for s in bad), {s: rows[s]["error"] for s in bad}


def test_decode_on_the_device_gives_the_same_rows(finished, broken_images, tiny_model, tmp_path):
    """input.decode: gpu through the whole job (on the CPU device here): the same error rows with the
    same messages, the same labels, embeddings within the parity bar."""
    out, _ = finished
    summary = clipbatch.run(broken_spec(broken_images, tiny_model, tmp_path / "out", labels={"top_k": 3},
                                        input={"decode": "gpu"}))
    assert summary.complete
    cpu, device = (pq.read_table(p).sort_by("id") for p in (out, tmp_path / "out"))
    assert device["id"].to_pylist() == cpu["id"].to_pylist()
    assert device["error"].to_pylist() == cpu["error"].to_pylist()
    assert device["label"].to_pylist() == cpu["label"].to_pylist()
    ok = [e is None for e in cpu["error"].to_pylist()]
    a, b = (np.stack(t.filter(ok)["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
            for t in (cpu, device))
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() >= 0.999
