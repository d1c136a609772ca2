"""Labels and prompts: template sets and files, classes files with synonyms, per-class prompts,
min_score/unknown, temperature, and the text head saved with the output and reused."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import clipbatch
from clipbatch.config import LabelsSpec, SpecError, load_spec
from clipbatch.labels import _prompt_length, build_text_head, class_probabilities, encode_text
from clipbatch.models import load_model
from clipbatch.templates import resolve_prompts, resolve_templates, template_set_names
from conftest import spec_dict
import helpers


def labels(**kw) -> LabelsSpec:
    return LabelsSpec(**({"classes": ["cat", "dog"]} | kw))


def test_builtin_sets_are_open_clips():
    from open_clip import zero_shot_metadata as meta

    assert {"openai", "simple", "imagenet", "simple-imagenet"} <= set(template_set_names())
    openai, name = resolve_templates("openai")
    assert name == "openai" and len(openai) == 80 and openai == [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
    assert resolve_templates("imagenet")[0] == openai
    assert resolve_templates("simple")[0] == ["a photo of a {}."]
    assert resolve_templates("simple-imagenet")[0] == [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES]
    assert len(resolve_templates("simple-imagenet")[0]) == 7


def test_templates_files(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("# mine\na photo of a {}.\n\nitap of a {}.\n")
    assert resolve_templates(labels(templates_file=str(txt))) == (["a photo of a {}.", "itap of a {}."], "file")
    listed = tmp_path / "t.yaml"
    listed.write_text(yaml.safe_dump(["a {}.", "the {}."]))
    assert resolve_templates(labels(templates_file=str(listed)))[0] == ["a {}.", "the {}."]
    sets = tmp_path / "sets.json"  # CLIP_benchmark's layout: dataset -> templates
    sets.write_text(json.dumps({"cifar10": ["a photo of a {}.", "a blurry photo of a {}."], "mnist": ["a {}"]}))
    assert resolve_templates(labels(templates_file=str(sets), templates="cifar10")) == (
        ["a photo of a {}.", "a blurry photo of a {}."], "file:cifar10")
    for kw, message in [({"templates_file": str(sets)}, "name one with labels.templates"),
                        ({"templates_file": str(sets), "templates": "cifar100"}, "has no set 'cifar100'"),
                        ({"templates_file": str(txt), "templates": "simple"}, "not both"),
                        ({"templates_file": str(tmp_path / "none.txt")}, "not found")]:
        with pytest.raises(SpecError, match=message):
            resolve_templates(labels(**kw))
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo\n")
    with pytest.raises(SpecError, match="has no {}"):
        resolve_templates(labels(templates_file=str(bad)))


def test_classes_files_with_synonyms(tmp_path):
    plain = tmp_path / "c.txt"
    plain.write_text("cat\n# comment\ndog\n")
    assert resolve_prompts(labels(classes=None, classes_file=str(plain), templates="simple")).prompts == [
        ["a photo of a cat."], ["a photo of a dog."]]
    rich = tmp_path / "c.yaml"
    rich.write_text("- cat\n- name: dog\n  synonyms: [puppy, hound]\n")
    p = resolve_prompts(labels(classes=None, classes_file=str(rich), templates=["a {}.", "the {}."]))
    assert p.names == ["cat", "dog"] and p.custom == ["dog"]
    assert p.prompts == [["a cat.", "the cat."], ["a dog.", "the dog.", "a puppy.", "the puppy.", "a hound.",
                                                   "the hound."]]
    mapping = tmp_path / "c.json"
    mapping.write_text(json.dumps({"cat": ["kitten"], "dog": []}))
    assert resolve_prompts(labels(classes=None, classes_file=str(mapping), templates="simple")).prompts == [
        ["a photo of a cat.", "a photo of a kitten."], ["a photo of a dog."]]
    dup = tmp_path / "d.yaml"
    dup.write_text("- cat\n- name: cat\n")
    with pytest.raises(SpecError, match="duplicate classes"):
        resolve_prompts(labels(classes=None, classes_file=str(dup)))


def test_per_class_prompts_file(tmp_path):
    cupl = tmp_path / "cupl.json"
    cupl.write_text(json.dumps({"cat": ["A cat has whiskers.", "A small furry pet."], "zebra": ["Stripes."]}))
    p = resolve_prompts(labels(prompts_file=str(cupl), templates="simple"))
    assert p.prompts == [["A cat has whiskers.", "A small furry pet."], ["a photo of a dog."]]
    assert p.custom == ["cat"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"zebra": ["Stripes."]}))
    with pytest.raises(SpecError, match="none of the classes"):
        resolve_prompts(labels(prompts_file=str(other)))


@pytest.mark.parametrize("change, message", [
    ({"templates": "cifar10"}, "unknown template set 'cifar10'"),
    ({"unknown": "other"}, "set min_score too"),
    ({"min_score": 1.5}, "labels.min_score"),
    ({"temperature": 0}, "labels.temperature"),
])
def test_bad_labels_spec(tmp_path, tiny_model, images, change, message):
    spec = spec_dict(images, tiny_model, tmp_path / "out", labels=change)
    with pytest.raises(SpecError, match=message):
        load_spec(spec)


def test_head_is_mean_of_normalized_prompt_embeddings(tiny_model):
    """Against open_clip directly: its build_zero_shot_classifier for plain templates, and the
    normalized mean over every synonym's prompts for a class with synonyms."""
    loaded = load_model(tiny_model, None, device="cpu", precision="fp32")
    templates = ["a photo of a {}.", "a drawing of a {}."]
    head = build_text_head(loaded, [[t.format(c) for t in templates] for c in ["cat", "dog"]])
    reference = open_clip.build_zero_shot_classifier(loaded.model, loaded.tokenizer, ["cat", "dog"], templates,
                                                     device="cpu").T.numpy()
    assert head.shape == (2, 64) and np.allclose(head, reference, atol=1e-5)
    sentences = ["a photo of a dog.", "a photo of a puppy.", "a drawing of a hound."]
    with torch.no_grad():
        each = loaded.model.encode_text(loaded.tokenizer(sentences), normalize=True)
    mean = each.mean(0)
    assert np.allclose(build_text_head(loaded, [sentences])[0], (mean / mean.norm()).numpy(), atol=1e-5)


def test_text_encoded_on_prompt_length_equals_full_context(tiny_model):
    """The text tower runs only up to the longest prompt's end token where that is exact (causal
    mask, end-token pooling), and gives open_clip's full-context result; a tower without a causal
    mask keeps the full context; the model is left as it was."""
    loaded = load_model(tiny_model, None, device="cpu", precision="fp32")
    model = loaded.model
    sentences = ["a cat.", "a photo of a small dog on a red sofa in the evening light.", "a hound."]
    tokens = loaded.tokenizer(sentences)
    positions, mask = model.positional_embedding, model.attn_mask
    assert _prompt_length(model, tokens) == int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]
    with torch.inference_mode():
        full, cut = model.encode_text(tokens), encode_text(model, tokens)
    assert cut.shape == full.shape and torch.allclose(cut, full, atol=1e-5, rtol=1e-5)
    assert model.positional_embedding is positions and model.attn_mask is mask
    # Shuffled lengths across batches: the head keeps the prompts' order.
    head = build_text_head(loaded, [[s] for s in sentences])
    assert np.allclose(head, torch.nn.functional.normalize(full, dim=-1).numpy(), atol=1e-5)

    cfg = {**helpers.TINY_VIT_CFG, "text_cfg": {**helpers.TINY_VIT_CFG["text_cfg"], "no_causal_mask": True}}
    assert _prompt_length(open_clip.model.CLIP(**cfg).eval(), tokens) is None


def test_temperature_divides_logits():
    cosine = torch.tensor([[0.30, 0.25, 0.10]])
    p1 = class_probabilities(cosine, 100.0, None).numpy()[0]
    p2 = class_probabilities(cosine, 100.0, None, temperature=2.0).numpy()[0]
    assert np.allclose(p2, np.exp([15.0, 12.5, 5.0]) / np.exp([15.0, 12.5, 5.0]).sum(), atol=1e-6)
    assert np.allclose(np.log(p1[0] / p1[1]), 2 * np.log(p2[0] / p2[1]), atol=1e-4)
    sig = class_probabilities(cosine, 10.0, -2.0, temperature=0.5).numpy()[0]
    assert np.allclose(sig, 1 / (1 + np.exp(-(10.0 * np.array([0.30, 0.25, 0.10]) - 2.0) / 0.5)), atol=1e-6)


def test_job_with_synonyms_min_score_saves_and_reuses_head(tmp_path, tiny_model, images, ray_local):
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

    # A resume takes the saved head instead of building it again: a saved head with its rows
    # rolled by one shifts every label of the rows the resume writes.
    np.save(out / "_text_head.npy", np.roll(head, 1, axis=0))
    first = sorted(out.glob("part-*.parquet"))[0]
    redo = set(pq.read_table(first)["id"].to_pylist())
    first.unlink()
    (out / "_SUCCESS").unlink()
    assert clipbatch.run(spec).complete
    again = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    before = {r["id"]: r for r in table.to_pylist()}
    for image_id in redo:
        assert np.allclose(np.roll(before[image_id]["scores"], 1), again[image_id]["scores"], atol=5e-3)
