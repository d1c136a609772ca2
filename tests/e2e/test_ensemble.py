"""Ensembles of models with weights, against a direct computation with each member model."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import clipbatch
from clipbatch.cli import main
from clipbatch.errors import UserError
from clipbatch.spec import load_spec
from clipbatch.pipeline.decode import decode_image, read_and_decode
from clipbatch.model.load import preprocess_config
from clipbatch.output.schema import matrix
from conftest import spec_dict
from helpers import TINY_VIT_CFG

CLASSES = ["group0", "group1", "group2"]  # the fixture's folders, so eval has a truth
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> str:
    """A second tiny CLIP with a different input size (32 px) and embedding size (48)."""
    from clipbatch.model.load import save_local_dir

    torch.manual_seed(2)
    cfg = {**TINY_VIT_CFG, "embed_dim": 48, "vision_cfg": {**TINY_VIT_CFG["vision_cfg"], "image_size": 32}}
    model = open_clip.model.CLIP(**cfg)
    with torch.no_grad():
        model.text_projection.mul_(8.0)
        model.logit_scale.fill_(float(np.log(20.0)))
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear", "resize_mode": "shortest"}
    return "local-dir:" + str(save_local_dir(model, cfg, tmp_path_factory.mktemp("models") / "small", pre))


def ensemble_spec(images, tiny_model, small_model, out) -> dict:
    spec = spec_dict(images, tiny_model, out, labels={"classes": CLASSES, "templates": TEMPLATES},
                     output={"embedding_dtype": "float32"})
    spec.pop("model")
    spec["models"] = [{"name": tiny_model, "weight": 0.7, "key": "tiny", "precision": "fp32"},
                      {"name": small_model, "weight": 0.3, "key": "small", "precision": "fp32"}]
    return spec


def test_ensemble_spec_checks(tmp_path, images, tiny_model, small_model):
    spec = ensemble_spec(images, tiny_model, small_model, tmp_path / "out")
    members = load_spec(spec).model_specs
    assert [(m.column_key, m.weight) for m in members] == [("tiny", 0.7), ("small", 0.3)]
    for change, message in [(lambda s: s["models"].pop(), "at least two models"),
                            (lambda s: s["models"][1].update(key="tiny"), "same column"),
                            (lambda s: s["models"][0].update(key="Tiny-1"), "lowercase"),
                            (lambda s: s["models"][0].update(weight=0), "greater than 0"),
                            (lambda s: s.update(model={"name": tiny_model}), "exactly one of model")]:
        bad = ensemble_spec(images, tiny_model, small_model, tmp_path / "out")
        change(bad)
        with pytest.raises(UserError, match=message):
            load_spec(bad)
    spec["models"][0].pop("key")
    assert load_spec(spec).model_specs[0].column_key == "tiny"  # local-dir:/.../tiny -> the folder's name


def test_each_image_is_decoded_once_into_every_size(images, tiny_model, small_model):
    cfgs = [json.dumps(preprocess_config(m, None)) for m in (tiny_model, small_model)]
    sources = np.array([str(p) for p in sorted(images.rglob("*.jpg"))], dtype=object)
    batch = read_and_decode({"id": sources, "source": sources}, cfgs[0], {}, more_cfgs_json=(cfgs[1],))
    assert batch["pixels"].shape[1:] == (64, 64, 3) and batch["pixels_1"].shape[1:] == (32, 32, 3)
    for i, source in enumerate(sources):
        data = open(source, "rb").read()
        assert np.array_equal(batch["pixels"][i], decode_image(data, cfgs[0])[0])
        assert np.array_equal(batch["pixels_1"][i], decode_image(data, cfgs[1])[0])


def reference(model_name: str, paths):
    """One member by open_clip's own recipe: its preprocess, encode_image/encode_text, prompt ensemble."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        head = open_clip.build_zero_shot_classifier(model, tokenizer, CLASSES, TEMPLATES, device="cpu")
        x = torch.stack([preprocess(Image.open(p)) for p in paths])
        emb = model.encode_image(x, normalize=True)
        probs = (model.logit_scale.exp() * emb @ head).softmax(-1)
    return emb.numpy(), probs.numpy()


def test_ensemble_matches_its_members(tmp_path, images, tiny_model, small_model, ray_local):
    out = tmp_path / "out"
    summary = clipbatch.run(ensemble_spec(images, tiny_model, small_model, out))
    assert summary.complete and summary.rows == 24 and summary.errors == 0
    table = pq.read_table(out)
    assert "embedding" not in table.column_names
    assert table.schema.field("embedding_tiny").type.list_size == 64
    assert table.schema.field("embedding_small").type.list_size == 48
    paths = [images / i for i in table["id"].to_pylist()]
    emb_tiny, p_tiny = reference(tiny_model, paths)
    emb_small, p_small = reference(small_model, paths)
    expected = 0.7 * p_tiny + 0.3 * p_small
    scores = matrix(table["scores"])
    assert np.abs(scores - expected).max() < 5e-3
    assert np.abs(p_tiny - p_small).max() > 0.05, "the members must disagree for the test to mean anything"
    for column, reference_emb in (("embedding_tiny", emb_tiny), ("embedding_small", emb_small)):
        got = matrix(table[column])
        assert (np.sum(got * reference_emb, 1) >= 0.999).all()
    clear = np.sort(expected, 1)[:, -1] - np.sort(expected, 1)[:, -2] > 0.01
    assert clear.sum() >= 12
    assert (np.array(table["label"].to_pylist())[clear] == np.array(CLASSES)[expected.argmax(1)][clear]).all()

    manifest = json.loads((out / "_manifest.json").read_text())
    assert [(m["weight"], m["embedding_column"], m["embedding_dim"]) for m in manifest["models"]] == [
        (0.7, "embedding_tiny", 64), (0.3, "embedding_small", 48)]
    assert (out / "_text_head.embedding_tiny.npy").is_file() and (out / "_text_head.embedding_small.npy").is_file()

    # eval works from the members' stored embeddings and heads: rescoring reproduces the stored scores
    spec_path = tmp_path / "job.yaml"
    import yaml
    spec_path.write_text(yaml.safe_dump(ensemble_spec(images, tiny_model, small_model, out)))
    assert main(["eval", str(spec_path), "--calibrate", "--templates", "simple"]) == 0
    m = json.loads((out / "_eval" / "metrics.json").read_text())
    assert m["n"] == 24 and m["template_sets"]["_job"]["max_abs_diff_vs_stored_scores"] < 1e-5
    assert m["calibration"]["logits_from"] == "embeddings"
    assert m["calibration"]["nll_after"] <= m["calibration"]["nll_before"]
    truth = np.array([CLASSES.index(i.split("/")[0]) for i in table["id"].to_pylist()])
    assert m["top1"] == pytest.approx((scores.argmax(1) == truth).mean())

    # relabel with the job's own classes and templates reproduces the stored scores from the
    # members' stored embeddings; search runs in the first member's embeddings
    assert main(["relabel", str(out), *sum((["--class", c] for c in CLASSES), []),
                 *sum((["--template", t] for t in TEMPLATES), []), "--out", str(tmp_path / "again")]) == 0
    again = pq.read_table(tmp_path / "again")
    assert again["id"].to_pylist() == table["id"].to_pylist()
    np.testing.assert_allclose(matrix(again["scores"]), scores, atol=1e-5)
    assert again["label"].to_pylist() == table["label"].to_pylist()
    assert main(["search", str(out), "a photo of a group1.", "-k", "3"]) == 0

def test_example_ensemble_spec_is_valid(tmp_path):
    """jobs/ensemble-openai.yaml, the seed articles' ensemble, validates and names its columns."""
    from pathlib import Path

    spec = load_spec(Path(__file__).resolve().parents[2] / "jobs" / "ensemble-openai.yaml")
    assert [(m.name, m.weight, m.column_key) for m in spec.model_specs] == [
        ("ViT-L-14", 0.45, "vit_l_14"), ("ViT-B-32", 0.35, "vit_b_32"), ("RN50", 0.20, "rn50")]
    assert spec.labels.min_score == 0.3 and spec.ensemble
