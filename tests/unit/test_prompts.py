"""Labels and prompts: template sets and files, classes files with synonyms, per-class prompts, and the
text head built from them (against open_clip's own zero-shot classifier)."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import yaml

from clipbatch.errors import UserError
from clipbatch.spec import LabelsSpec, load_spec
from clipbatch.model.text_head import _prompt_length, build_text_head, encode_text
from clipbatch.model.load import load_model
from clipbatch.model.prompts import resolve_prompts, resolve_templates, template_set_names
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
        with pytest.raises(UserError, match=message):
            resolve_templates(labels(**kw))
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo\n")
    with pytest.raises(UserError, match="has no {}"):
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
    with pytest.raises(UserError, match="duplicate classes"):
        resolve_prompts(labels(classes=None, classes_file=str(dup)))


def test_per_class_prompts_file(tmp_path):
    cupl = tmp_path / "cupl.json"
    cupl.write_text(json.dumps({"cat": ["A cat has whiskers.", "A small furry pet."], "zebra": ["Stripes."]}))
    p = resolve_prompts(labels(prompts_file=str(cupl), templates="simple"))
    assert p.prompts == [["A cat has whiskers.", "A small furry pet."], ["a photo of a dog."]]
    assert p.custom == ["cat"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"zebra": ["Stripes."]}))
    with pytest.raises(UserError, match="none of the classes"):
        resolve_prompts(labels(prompts_file=str(other)))


@pytest.mark.parametrize("change, message", [
    ({"templates": "cifar10"}, "unknown template set 'cifar10'"),
    ({"unknown": "other"}, "set min_score too"),
    ({"min_score": 1.5}, "labels.min_score"),
    ({"temperature": 0}, "labels.temperature"),
])
def test_bad_labels_spec(tmp_path, tiny_model, images, change, message):
    spec = spec_dict(images, tiny_model, tmp_path / "out", labels=change)
    with pytest.raises(UserError, match=message):
        resolve_prompts(load_spec(spec).labels)


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
