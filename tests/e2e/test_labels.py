"""A job's labels end to end: synonyms, min_score/unknown and temperature in the written rows, and the
text head saved beside the output (for eval and relabel), built again by every run."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import clipbatch
from clipbatch.model.load import load_model
from clipbatch.model.text_head import build_text_head
from conftest import spec_dict


def test_job_with_synonyms_min_score_saves_its_head(tmp_path, tiny_model, images, ray_local):
    classes = tmp_path / "classes.yaml"
    classes.write_text("- name: cat\n  synonyms: [kitten]\n- dog\n- car\n- tree\n- house\n")
    out = tmp_path / "out"
    spec = spec_dict(images, tiny_model, out, labels={"classes": None, "classes_file": str(classes),
                                                     "min_score": 0.88, "unknown": "other", "temperature": 0.5})
    spec["labels"].pop("classes")
    assert clipbatch.run(spec).complete
    table = pq.read_table(out)
    scores = np.stack(table["scores"].to_numpy(zero_copy_only=False))
    top = scores.max(1)
    names = np.array(["cat", "dog", "car", "tree", "house"])
    expected = np.where(top < 0.88, "other", names[scores.argmax(1)])
    assert table["label"].to_pylist() == expected.tolist()
    assert np.allclose(scores.sum(1), 1.0, atol=1e-4) and table["score"].to_numpy() == pytest.approx(top)
    assert (top < 0.88).any() and (top >= 0.88).any(), "the test needs images on both sides of min_score"

    loaded = load_model(tiny_model, None, device="cpu")
    templates = ["a photo of a {}.", "a drawing of a {}."]
    prompts = [[t.format(s) for s in synonyms for t in templates]
               for synonyms in (["cat", "kitten"], ["dog"], ["car"], ["tree"], ["house"])]
    head = np.load(out / "_text_head.npy")
    assert np.allclose(head, build_text_head(loaded, prompts), atol=1e-5)
    emb = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    direct = torch.softmax(torch.from_numpy(30.0 * emb @ head.T / 0.5), -1).numpy()
    assert np.abs(direct - scores).max() < 5e-3  # fp16 embeddings

    # A resume builds the head again: a saved head with its rows rolled by one changes nothing it
    # writes, and is replaced by the right one.
    np.save(out / "_text_head.npy", np.roll(head, 1, axis=0))
    first = sorted(out.glob("part-*.parquet"))[0]
    redo = set(pq.read_table(first)["id"].to_pylist())
    first.unlink()
    (out / "_SUCCESS").unlink()
    assert clipbatch.run(spec).complete
    again = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    before = {r["id"]: r for r in table.to_pylist()}
    for image_id in redo:
        assert np.allclose(before[image_id]["scores"], again[image_id]["scores"], atol=1e-6)
    assert np.allclose(np.load(out / "_text_head.npy"), head, atol=1e-6)
