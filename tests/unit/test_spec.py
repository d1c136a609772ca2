"""A bad spec fails before any work, with one line naming the problem and a non-zero exit code."""

from __future__ import annotations

import pytest
import yaml

from clipbatch.cli import main
from clipbatch.spec import load_spec
from conftest import spec_dict


def run_cli(tmp_path, spec: dict, *extra: str, command: str = "validate"):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return main([command, str(path), *extra])


@pytest.mark.parametrize("mutate, expected", [
    (lambda s: s["input"].update(colour="blue"), "unknown key 'input.colour'"),
    (lambda s: s.update(extra_section={}), "unknown key 'extra_section'"),
    (lambda s: s["labels"].pop("classes"), "give exactly one of labels.classes or labels.classes_file"),
    (lambda s: s["labels"].update(classes=[]), "labels.classes: is empty"),
    (lambda s: s["labels"].update(templates=["a photo of a cat"]), "has no {} where the class name goes"),
    (lambda s: s["labels"].update(templates="nonsense"), "unknown template set 'nonsense'"),
    (lambda s: s["model"].update(name="ViT-B-33"), "unknown model 'ViT-B-33'; did you mean ViT-B-32"),
    (lambda s: s["model"].update(name="ViT-B-32", pretrained="no-such-tag"), "pretrained 'no-such-tag'"),
    (lambda s: s["input"].update(path="/nonexistent/images"), "/nonexistent/images does not exist"),
    (lambda s: s["output"].update(storage_options={"secret": "x"}), "credentials come from the environment"),
    (lambda s: s["compute"].update(actors=[3, 1]), "compute.actors"),
    (lambda s: s["compute"].update(cpus_per_actor=0), "compute.cpus_per_actor: must be > 0"),
    (lambda s: s.pop("output"), "missing required key 'output'"),
])
def test_bad_spec_one_line(tmp_path, capsys, tiny_model, images, mutate, expected):
    spec = spec_dict(images, tiny_model, tmp_path / "out", compute={})
    mutate(spec)
    assert run_cli(tmp_path, spec) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("clipbatch: error: ") and expected in err, err


def test_zero_images_found(tmp_path, capsys, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not an image")
    assert run_cli(tmp_path, spec_dict(empty, tiny_model, tmp_path / "out")) == 2
    assert "no images found" in capsys.readouterr().err


def test_run_bad_spec_stops_the_ray_it_started(tmp_path, capsys, tiny_model, monkeypatch):
    """`clipbatch run` checks the spec before it starts Ray: a spec that fails leaves no Ray and no output."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    was_running = ray.is_initialized()
    spec = spec_dict(tmp_path / "missing", tiny_model, tmp_path / "out")
    assert run_cli(tmp_path, spec, command="run") == 2
    assert ray.is_initialized() == was_running
    assert not (tmp_path / "out").exists()


def test_validate_prints_plan(tmp_path, capsys, tiny_model, images):
    assert run_cli(tmp_path, spec_dict(images, tiny_model, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "24 found" in out and "classes    5: cat, dog" in out and "nothing was run" in out
    assert not (tmp_path / "out").exists()


def test_overrides_parse_yaml_values(tmp_path, tiny_model, images):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec_dict(images, tiny_model, tmp_path / "out")))
    spec = load_spec(path, {"compute.actors": [1, 3], "output.path": "s3://b/p", "labels.top_k": 2})
    assert spec.compute.actors == (1, 3) and spec.output.path == "s3://b/p" and spec.labels.top_k == 2


def test_smallest_spec_has_defaults(tmp_path, tiny_model, images):
    spec = load_spec({"input": {"path": str(images)}, "model": {"name": tiny_model},
                      "labels": {"classes": ["a"]}, "output": {"path": str(tmp_path)}})
    assert spec.labels.templates == "openai" and spec.output.mode == "resume"
    assert spec.compute.device == "auto" and spec.output.embedding_dtype == "float16"


def test_unreachable_hub_model_fails_before_work(tmp_path, capsys, images, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = spec_dict(images, "hf-hub:no-such-org/no-such-clip", tmp_path / "out")
    assert run_cli(tmp_path, spec, command="run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hf-hub:no-such-org/no-such-clip" in err and "hub" in err, err


def test_the_spec_alone_imports_no_model_code(images):
    """Validating a spec is pure: pydantic and YAML, no torch, no open_clip, no Ray."""
    import subprocess
    import sys

    code = ("import sys; from clipbatch.spec import load_spec; "
            f"load_spec({{'input': {{'path': {str(images)!r}}}, 'model': {{'name': 'ViT-B-32'}}, "
            "'labels': {'classes': ['a'], 'templates': 'openai'}, 'output': {'path': 'out'}}); "
            "print(sorted(m for m in ('torch', 'open_clip', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
