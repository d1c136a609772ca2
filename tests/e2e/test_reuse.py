"""Relabel and search over stored embeddings: checked against direct numpy computations with
open_clip's own text tower, against a real rerun, and on the real S3 server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch

import clipbatch
from clipbatch.cli import main as cli_main
from clipbatch.errors import UserError
from clipbatch.commands.relabel import Relabel
from clipbatch.output.schema import read_metadata
from conftest import broken_spec, s3_library_spec, spec_dict
from helpers import chromium_dom

NEW_CLASSES = ["bicycle", "mountain", "pattern", "stripes"]
NEW_TEMPLATES = ["a photo of {}.", "an image showing {}."]


def read_sorted(path, filesystem=None):
    return pq.read_table(path, filesystem=filesystem).sort_by("id")


def matrix(column) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float32) for v in column.to_pylist() if v is not None])


def reference_head(model_name: str, classes: list[str], templates: list[str]) -> tuple[np.ndarray, float]:
    """open_clip's text tower used directly: mean of normalized template embeddings, normalized."""
    model, _, _ = open_clip.create_model_and_transforms(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    rows = []
    with torch.no_grad():
        for c in classes:
            e = model.encode_text(tokenizer([t.format(c) for t in templates])).float()
            e = torch.nn.functional.normalize(e, dim=-1).mean(0)
            rows.append(torch.nn.functional.normalize(e, dim=0))
    return torch.stack(rows).numpy().astype(np.float64), model.logit_scale.exp().item()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def fp32_output(broken_images, tiny_model, tmp_path_factory, ray_local):
    """A finished job over good and broken images, float32 embeddings."""
    out = tmp_path_factory.mktemp("reuse") / "fp32"
    assert clipbatch.run(broken_spec(broken_images, tiny_model, out, output={"embedding_dtype": "float32"})).complete
    return out


def test_relabel_equals_direct_computation_and_keeps_the_rest(fp32_output, tiny_model, tmp_path):
    out = tmp_path / "relabeled"
    rc = cli_main(["relabel", str(fp32_output), *sum((["--class", c] for c in NEW_CLASSES), []),
                   *sum((["--template", t] for t in NEW_TEMPLATES), []), "--out", str(out)])
    assert rc == 0 and (out / "_SUCCESS").exists()
    before, after = read_sorted(fp32_output), read_sorted(out)
    for column in ("id", "source", "width", "height", "error", "embedding"):
        assert after[column].to_pylist() == before[column].to_pylist(), column
    meta = read_metadata(after.schema)
    assert meta["classes"] == NEW_CLASSES and meta["templates"] == NEW_TEMPLATES
    assert meta["relabeled_from"] == str(fp32_output)

    head, scale = reference_head(tiny_model, NEW_CLASSES, NEW_TEMPLATES)
    valid = np.array([e is None for e in after["error"].to_pylist()])
    assert 0 < valid.sum() < after.num_rows  # both kinds of rows are there
    expected = softmax(scale * matrix(after["embedding"]).astype(np.float64) @ head.T)
    scores = matrix(after["scores"])
    np.testing.assert_allclose(scores, expected, atol=2e-5)
    labels = [v for v, ok in zip(after["label"].to_pylist(), valid) if ok]
    assert labels == [NEW_CLASSES[i] for i in expected.argmax(1)]
    assert all(v is None for v, ok in zip(after["label"].to_pylist(), valid) if not ok)
    tops = [v for v in after["top_labels"].to_pylist() if v is not None]
    assert all(len(t) == 4 for t in tops)  # the source's top_k was 5; only 4 classes now
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"] == {"rows": after.num_rows, "errors": int((~valid).sum())}

    assert cli_main(["relabel", str(fp32_output), *sum((["--class", c] for c in NEW_CLASSES), []),
                     *sum((["--template", t] for t in NEW_TEMPLATES), []), "--out", str(out)]) == 0  # no-op

    # A relabel killed part-way: no _SUCCESS, a part missing. The rerun redoes only that part.
    (out / "_SUCCESS").unlink()
    lost = sorted(out.glob("part-*.parquet"))[0]
    lost.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    Relabel(str(fp32_output), str(out), classes=NEW_CLASSES, templates=NEW_TEMPLATES).run()
    assert (out / "_SUCCESS").exists() and lost.exists()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p != lost} == kept
    assert read_sorted(out).equals(after)
    with pytest.raises(UserError, match="already holds other results"):
        Relabel(str(fp32_output), str(out), classes=["x", "y"]).run()


def test_relabel_equals_a_rerun_with_the_new_classes(broken_images, fp32_output, tiny_model, tmp_path, ray_local):
    relabeled = tmp_path / "relabeled"
    Relabel(str(fp32_output), str(relabeled), classes=NEW_CLASSES, templates=NEW_TEMPLATES).run()
    rerun = tmp_path / "rerun"
    spec = broken_spec(broken_images, tiny_model, rerun, output={"embedding_dtype": "float32"},
                       labels={"classes": NEW_CLASSES, "templates": NEW_TEMPLATES})
    assert clipbatch.run(spec).complete
    a, b = read_sorted(relabeled), read_sorted(rerun)
    assert a["id"].to_pylist() == b["id"].to_pylist()
    assert a["label"].to_pylist() == b["label"].to_pylist()
    np.testing.assert_allclose(matrix(a["scores"]), matrix(b["scores"]), atol=1e-6)
    assert a["top_labels"].to_pylist() == b["top_labels"].to_pylist()


def test_min_score_nulls_the_label_but_keeps_the_scores(fp32_output, tmp_path):
    Relabel(str(fp32_output), str(tmp_path / "all"), classes=NEW_CLASSES).run()
    threshold = float(np.median([s for s in read_sorted(tmp_path / "all")["score"].to_pylist() if s is not None]))
    out = tmp_path / "strict"
    Relabel(str(fp32_output), str(out), classes=NEW_CLASSES, min_score=threshold).run()
    table = read_sorted(out)
    scores, labels = table["score"].to_pylist(), table["label"].to_pylist()
    ok = [e is None for e in table["error"].to_pylist()]
    assert any(s is not None and s < threshold for s in scores)
    for s, label, good in zip(scores, labels, ok):
        if good:
            assert (label is None) == (s < threshold)
    assert all(len(v) == 4 for v in table["scores"].to_pylist() if v is not None)
    assert table["scores"].to_pylist() == read_sorted(tmp_path / "all")["scores"].to_pylist()
    assert read_metadata(table.schema)["min_score"] == threshold


def test_relabel_refusals(fp32_output, images, tiny_model, tmp_path, ray_local, capsys):
    no_embeddings = tmp_path / "no-emb"
    assert clipbatch.run(spec_dict(images, tiny_model, no_embeddings, output={"embeddings": False})).complete
    with pytest.raises(UserError, match="holds no embeddings"):
        Relabel(str(no_embeddings), str(tmp_path / "x"), classes=NEW_CLASSES)
    assert cli_main(["relabel", str(no_embeddings), "--class", "a", "--out", str(tmp_path / "y")]) == 2
    assert "holds no embeddings" in capsys.readouterr().err

    with pytest.raises(UserError, match="no clipbatch output"):
        Relabel(str(tmp_path / "nothing"), str(tmp_path / "x"), classes=NEW_CLASSES)
    with pytest.raises(UserError, match="duplicates"):
        Relabel(str(fp32_output), str(tmp_path / "x"), classes=["a", "a"])
    with pytest.raises(UserError, match="new output path"):
        Relabel(str(fp32_output), str(fp32_output), classes=NEW_CLASSES)

    # An output whose model is gone: copy a finished output, then point its metadata at a missing folder.
    moved = tmp_path / "moved-model"
    model_dir = tmp_path / "model-copy"
    shutil.copytree(tiny_model.removeprefix("local-dir:"), model_dir)
    assert clipbatch.run(spec_dict(images, f"local-dir:{model_dir}", moved)).complete
    shutil.rmtree(model_dir)
    with pytest.raises(UserError, match="cannot load the model that made"):
        Relabel(str(moved), str(tmp_path / "z"), classes=NEW_CLASSES).run()


def test_relabel_float16_embeddings_stay_close_to_float32(broken_images, fp32_output, tiny_model, tmp_path,
                                                          ray_local):
    fp16 = tmp_path / "fp16"
    assert clipbatch.run(broken_spec(broken_images, tiny_model, fp16)).complete
    Relabel(str(fp16), str(tmp_path / "a"), classes=NEW_CLASSES).run()
    Relabel(str(fp32_output), str(tmp_path / "b"), classes=NEW_CLASSES).run()
    a, b = read_sorted(tmp_path / "a"), read_sorted(tmp_path / "b")
    difference = np.abs(matrix(a["scores"]) - matrix(b["scores"])).max()
    print(f"largest float16 vs float32 score difference: {difference:.2e}")
    assert difference < 2e-3


# ---- search -------------------------------------------------------------------------------------

def numpy_ranking(table, query: np.ndarray, keep=lambda row: True) -> list[tuple[str, float]]:
    rows = [r for r in table.to_pylist() if r["embedding"] is not None and keep(r)]
    emb = np.array([r["embedding"] for r in rows], dtype=np.float64)
    cos = emb @ query / np.linalg.norm(emb, axis=1) / np.linalg.norm(query)
    order = np.argsort(-cos, kind="stable")
    return [(rows[i]["id"], float(cos[i])) for i in order]


def text_embedding(model_name: str, text: str) -> np.ndarray:
    model, _, _ = open_clip.create_model_and_transforms(model_name)
    with torch.no_grad():
        e = model.eval().encode_text(open_clip.get_tokenizer(model_name)([text])).float()
    return torch.nn.functional.normalize(e, dim=-1)[0].numpy().astype(np.float64)


def test_search_text_top_k_equals_numpy_ranking(fp32_output, tiny_model, capsys):
    assert cli_main(["search", str(fp32_output), "red stripes", "-k", "7", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    expected = numpy_ranking(read_sorted(fp32_output), text_embedding(tiny_model, "red stripes"))[:7]
    assert [r["id"] for r in results] == [i for i, _ in expected]
    np.testing.assert_allclose([r["score"] for r in results], [s for _, s in expected], atol=1e-5)
    assert set(results[0]) == {"id", "source", "score", "label"}

    assert cli_main(["search", str(fp32_output), "red stripes", "-k", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == ["rank", "score", "label"] and len(printed) == 4
    assert expected[0][0] in printed[1]


def test_search_where_filters(fp32_output, tiny_model, capsys):
    table = read_sorted(fp32_output)
    labels = [v for v in table["label"].to_pylist() if v]
    common = max(set(labels), key=labels.count)
    floor = float(np.median([r["score"] for r in table.to_pylist() if r["label"] == common]))
    where = f"label = '{common}' AND score > {floor}"
    assert cli_main(["search", str(fp32_output), "a dog", "-k", "50", "--json", "--where", where]) == 0
    results = json.loads(capsys.readouterr().out)
    expected = numpy_ranking(table, text_embedding(tiny_model, "a dog"),
                             keep=lambda r: r["label"] == common and r["score"] > floor)
    assert 0 < len(results) == len(expected) < labels.count(common)
    assert [r["id"] for r in results] == [i for i, _ in expected]
    assert all(r["label"] == common for r in results)

    assert cli_main(["search", str(fp32_output), "a dog", "--where", "no_such_column > 1"]) == 2
    assert "--where" in capsys.readouterr().err


def test_search_by_image_finds_the_image_itself(fp32_output, broken_images, capsys, tmp_path):
    target = next(p for p in sorted(broken_images.rglob("*.png")) if "bad" not in p.parts)
    html = tmp_path / "gallery.html"
    assert cli_main(["search", str(fp32_output), "--image", str(target), "-k", "5", "--json",
                     "--html", str(html)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results[0]["source"].endswith(target.name) and results[0]["score"] > 0.9999
    page = html.read_text()
    assert page.count('<img src="data:image/jpeg;base64,') == 5 and "cdn" not in page.lower()
    if shutil.which("chromium"):  # CI installs it: every thumbnail decodes in a real browser
        body = re.search(r"<body[^>]*>", chromium_dom(html.as_uri())).group(0)
        assert 'data-images="5"' in body and 'data-broken="0"' in body, body


def test_search_refusals(fp32_output, tmp_path, capsys):
    assert cli_main(["search", str(fp32_output)]) == 2
    assert "text query or --image" in capsys.readouterr().err
    assert cli_main(["search", str(tmp_path / "none"), "x"]) == 2
    assert "no clipbatch output" in capsys.readouterr().err


@pytest.mark.slow
def test_relabel_and_search_on_s3(s3, pets_bucket, tiny_model, s3_library_run):
    fs = pets_bucket
    spec = s3_library_spec(s3, tiny_model)  # what s3_library_run made, in s3://pets/out
    assert s3_library_run.complete
    option = ["--storage-option", f"endpoint_url={s3.endpoint}"]
    # In a separate process, as a user runs it: credentials come from the environment only.
    done = subprocess.run([sys.executable, "-m", "clipbatch.cli", "relabel", "s3://pets/out", "--class", "stripes",
                           "--class", "dots", "--out", "s3://pets/relabeled", *option],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert fs.exists("pets/relabeled/_SUCCESS")
    relabeled = read_sorted("pets/relabeled", fs)
    original = read_sorted("pets/out", fs)
    assert relabeled["id"].to_pylist() == original["id"].to_pylist()
    head, scale = reference_head(tiny_model, ["stripes", "dots"], spec["labels"]["templates"])
    np.testing.assert_allclose(matrix(relabeled["scores"]),
                               softmax(scale * matrix(relabeled["embedding"]).astype(np.float64) @ head.T),
                               atol=2e-5)
    found = subprocess.run([sys.executable, "-m", "clipbatch.cli", "search", "s3://pets/relabeled", "stripes",
                            "-k", "3", "--json", *option], capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr
    results = json.loads(found.stdout)
    expected = numpy_ranking(relabeled, text_embedding(tiny_model, "stripes"))[:3]
    assert [r["id"] for r in results] == [i for i, _ in expected]
    assert all(r["source"].startswith("s3://pets/images/") for r in results)
