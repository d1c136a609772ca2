"""The bundled demo: the training script, the packaged model, and `clipbatch demo` end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipbatch.commands import demo_world as world

REPO = Path(__file__).resolve().parents[2]


def test_world_is_seeded_and_held_out_is_spread():
    assert len(world.CLASSES) == 36 and len(set(world.CLASSES)) == 36
    colours = {world.split_class(c)[0] for c in world.HELD_OUT}
    shapes = {world.split_class(c)[1] for c in world.HELD_OUT}
    assert len(world.HELD_OUT) == 6 and len(colours) == 6 and len(shapes) == 6
    assert not set(world.HELD_OUT) & set(world.TRAIN_CLASSES)
    a = [np.asarray(im) for im, _ in world.sample(7, 2, ["red circle", "blue ring"])]
    b = [np.asarray(im) for im, _ in world.sample(7, 2, ["blue ring", "red circle"])]
    assert np.array_equal(a[0], b[2]) and np.array_equal(a[2], b[0])
    assert a[0].shape == (64, 64, 3)
    assert world.DEMO_SEED not in (world.TRAIN_SEED, world.VAL_SEED)
    def words(texts):
        return {w for t in texts for w in re.findall(r"[a-z]+", t.replace("{}", " "))}

    assert words(world.DEMO_TEMPLATES) - words(world.TRAIN_CAPTIONS), "one template wording must be new"


def test_train_smoke_writes_loadable_model(tmp_path):
    import open_clip

    out = tmp_path / "model"
    script = REPO / "scripts" / "train_demo_model.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "3", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "open_clip_config.json").is_file() and (out / "open_clip_model.safetensors").is_file()
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and set(record["accuracy"]) == {"seen", "all", "unseen"}
    model = open_clip.create_model(f"local-dir:{out}")
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    with torch.inference_mode():
        img = model.encode_image(torch.zeros(2, 3, 64, 64))
        txt = model.encode_text(tok(["a photo of a red circle."]))
    assert img.shape == (2, 128) and txt.shape == (1, 128)


def test_packaged_model_loads_by_short_name_and_path():
    from clipbatch.model.load import DEMO_MODEL_DIR, load_model

    assert (DEMO_MODEL_DIR / "open_clip_config.json").is_file()
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir() if f.is_file())
    assert size <= 20 * 1024 * 1024
    by_name = load_model("clipbatch-demo", None, device="cpu")
    by_path = load_model(f"local-dir:{DEMO_MODEL_DIR}", None, device="cpu")
    a, b = by_name.model.state_dict(), by_path.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert by_name.preprocess_cfg["size"] in (64, (64, 64))
    record = json.loads((DEMO_MODEL_DIR / "training.json").read_text())
    assert record["accuracy"]["all"] >= 0.9


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch):
    import ray

    from clipbatch.commands.demo import run_demo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = not ray.is_initialized()  # leave a session-wide Ray from other tests running
    try:
        metrics = run_demo(tmp_path, n=216, seed=world.DEMO_SEED)
    finally:
        if ours:
            ray.shutdown()
    assert metrics["rows"] == 216 and metrics["errors"] == 0 and metrics["complete"]
    assert metrics["accuracy"] >= 0.90, metrics
    assert set(metrics["held_out_per_class"]) == set(world.HELD_OUT)
    images = sorted(p.relative_to(tmp_path / "images").parts[0] for p in (tmp_path / "images").rglob("*.png"))
    assert len(images) == 216 and set(images) == set(world.CLASSES)
    import yaml
    spec = yaml.safe_load((tmp_path / "job.yaml").read_text())
    assert spec["model"] == {"name": "clipbatch-demo"} and spec["labels"]["templates"] == world.DEMO_TEMPLATES
