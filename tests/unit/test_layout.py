"""The output folder without Ray: atomic content-named parts, the resume check, metadata in every
shape clipbatch has written, and errors as one redacted line."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from clipbatch.errors import UserError, add_secret, one_line
from clipbatch.model.members import Member, current_metadata, members_from_metadata
from clipbatch.output import resume
from clipbatch.output.finish import finish
from clipbatch.output.layout import MANIFEST, SUCCESS, OutputDir, part_name, write_part
from clipbatch.output.schema import output_schema

FINGERPRINT = {"model": "m", "classes": ["cat", "dog"]}


def output(tmp_path) -> OutputDir:
    out = OutputDir(str(tmp_path / "out"), {})
    out.check_writable()  # as a job does first: the folder exists
    return out


def rows(ids: list[str], fingerprint: dict = FINGERPRINT) -> pa.Table:
    schema = output_schema(2, {"embedding": 4}, None, {"fingerprint": fingerprint})
    return pa.table({"id": ids, "source": [f"/img/{i}" for i in ids], "error": [None] * len(ids)}).select(
        ["id", "source", "error"]).cast(pa.schema([schema.field(n) for n in ("id", "source", "error")],
                                                  metadata=schema.metadata))


def test_parts_are_named_by_their_ids_and_appear_whole(tmp_path):
    out = output(tmp_path)
    table = rows(["a", "b"])
    assert part_name(table["id"]) == part_name(rows(["a", "b"])["id"]) != part_name(rows(["b", "a"])["id"])
    write_part(out, table, part_name(table["id"]))
    write_part(out, table, part_name(table["id"]))  # a retried write replaces the same file
    assert len(out.parts()) == 1 and not out.leftovers()
    assert out.written_rows()["id"].to_pylist() == ["a", "b"]


def test_resume_check_applies_the_mode_and_refuses_other_results(tmp_path):
    out = output(tmp_path)
    assert resume.check(out, FINGERPRINT) is False  # nothing there yet
    write_part(out, rows(["a"]), "part-x.parquet")
    (tmp_path / "out" / ".part-y.parquet.1234.tmp").write_bytes(b"half")
    assert resume.check(out, FINGERPRINT) is False and not out.leftovers()  # a killed run's leftovers go
    with pytest.raises(UserError, match=r"made with a different classes\); use another"):
        resume.check(out, {**FINGERPRINT, "classes": ["cat"]})
    with pytest.raises(UserError, match="already holds output"):
        resume.check(out, FINGERPRINT, mode="error")
    out.write_text(SUCCESS, "")
    assert resume.check(out, FINGERPRINT) is True
    assert resume.check(out, {"other": 1}, mode="overwrite") is False and not out.parts()


def test_pending_images_are_the_listing_minus_the_written_ids(tmp_path):
    out = output(tmp_path)
    write_part(out, rows(["a", "c"]), "part-x.parquet")
    listing = pa.table({"id": ["a", "b", "c", "d"], "source": ["/a", "/b", "/c", "/d"]})
    assert resume.pending(listing, out, "images")["id"].to_pylist() == ["b", "d"]


def test_pending_shards_skip_those_recorded_complete(tmp_path):
    out = output(tmp_path)
    write_part(out, rows(["s1/a", "s1/b", "s2/a"]).set_column(1, "source", pa.array(["/s1", "/s1", "/s2"])),
               "part-x.parquet")
    resume.write_shard_record(out, "/s1", 2)  # s1 was read to its end: 2 rows, both written
    resume.write_shard_record(out, "/s2", 3)  # s2 holds 3 rows, 1 written
    listing = pa.table({"id": ["s1", "s2", "s3"], "source": ["/s1", "/s2", "/s3"]})
    todo = resume.pending(listing, out, "webdataset")
    assert todo["source"].to_pylist() == ["/s2", "/s3"] and todo["done"].to_pylist() == [["s2/a"], []]


def test_finish_writes_heads_manifest_and_success_last(tmp_path):
    import numpy as np

    out = output(tmp_path)
    manifest = finish(out, {"fingerprint": FINGERPRINT, "classes": ["cat"]}, {"embedding": np.eye(2)},
                      {"counts": {"rows": 0}}, complete=False)
    assert not out.exists(SUCCESS) and json.loads(out.fs.cat_file(out.join(MANIFEST))) == manifest
    assert manifest["fingerprint"] == FINGERPRINT and manifest["complete"] is False
    assert np.array_equal(out.read_head("embedding"), np.eye(2))
    finish(out, {"fingerprint": FINGERPRINT}, {}, {}, complete=True)
    assert out.exists(SUCCESS)


def test_metadata_of_every_shape_gives_the_same_members():
    member = Member("ViT-B-32", "openai", "fp16", 1.0, "embedding", {"size": [224, 224]}, 100.0, None, 512)
    current = {"models": [member.metadata()], "classes": ["cat"]}
    one_model = {"model": "ViT-B-32", "pretrained": "openai", "precision": "fp16", "logit_scale": 100.0,
                 "logit_bias": None, "preprocess_cfg": {"size": [224, 224]}, "embedding_dim": 512, "classes": ["cat"]}
    ensemble = {"model": "ensemble", "pretrained": None, "ensemble": [member.metadata()], "classes": ["cat"]}
    for metadata in (current, one_model, ensemble):
        assert members_from_metadata(metadata) == [member]
        assert current_metadata(metadata) == current


def test_one_line_is_one_redacted_line(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    add_secret("file-token-1234")
    exc = OSError("denied for s3cr3t-value with file-token-1234\nTraceback (most recent call last): ...")
    assert one_line(exc) == "OSError: denied for *** with ***"
    assert one_line(ValueError()) == "ValueError: no detail" and len(one_line(ValueError("x" * 999))) == 300


def test_an_unexpected_error_is_its_innermost_cause_without_colours():
    from clipbatch.errors import unexpected

    try:
        try:
            raise OSError("disk gone")
        except OSError as inner:
            raise RuntimeError("\x1b[36mwrapper\x1b[39m") from inner
    except RuntimeError as outer:
        assert unexpected(outer) == "OSError: disk gone"
    assert one_line(ValueError("\x1b[36mray::MapWorker\x1b[39m (pid=1)")) == "ValueError: ray::MapWorker (pid=1)"
