"""clipbatch's results against open_clip's own reference pipeline, in fp32 on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import clipbatch
from conftest import CLASSES, TEMPLATES, library_spec, spec_dict


def reference(model_name: str, image_paths, root):
    """open_clip's documented recipe: create_model_and_transforms, encode_image/encode_text, prompt ensemble."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        head = []
        for c in CLASSES:
            t = model.encode_text(tokenizer([tpl.format(c) for tpl in TEMPLATES]), normalize=True)
            mean = t.mean(0)
            head.append(mean / mean.norm())
        head = torch.stack(head)
        out = {}
        for path in image_paths:
            x = preprocess(Image.open(path)).unsqueeze(0)
            emb = model.encode_image(x, normalize=True)
            logits = model.logit_scale.exp() * emb @ head.T
            if model.logit_bias is not None:
                probs = torch.sigmoid(logits + model.logit_bias)
            else:
                probs = logits.softmax(-1)
            out[str(path.relative_to(root))] = (emb[0].numpy(), probs[0].numpy())
    return out


@pytest.mark.parametrize("model_fixture", ["tiny_model", "siglip_model"])
def test_matches_open_clip_reference(request, model_fixture, images, library_run):
    model_name = request.getfixturevalue(model_fixture)
    summary, out = library_run(model_name)
    assert summary.complete and summary.rows == 24 and summary.errors == 0

    table = pq.read_table(out)
    rows = {r["id"]: r for r in table.to_pylist()}
    expected = reference(model_name, sorted(images.rglob("*.*")), images)
    assert set(rows) == set(expected)
    for image_id, (emb, probs) in expected.items():
        row = rows[image_id]
        got = np.asarray(row["embedding"], dtype=np.float32)
        cosine = float(got @ emb / np.linalg.norm(got) / np.linalg.norm(emb))
        assert cosine >= 0.999, (image_id, cosine)
        np.testing.assert_allclose(row["scores"], probs, atol=5e-3, err_msg=image_id)
        assert row["label"] == CLASSES[int(np.argmax(probs))] or \
            np.sort(probs)[-1] - np.sort(probs)[-2] < 5e-3, image_id
    if model_fixture == "siglip_model":
        sums = np.array([sum(r["scores"]) for r in rows.values()])
        assert not np.allclose(sums, 1.0), "SigLIP-style scores are independent sigmoids, not a softmax"


@pytest.mark.slow
def test_builtin_name_with_checkpoint_file(tmp_path, images, ray_local):
    """`pretrained: /path/ckpt.pt` with a built-in open_clip name loads those weights (not a random init)."""
    torch.manual_seed(123)
    model = open_clip.create_model("ViT-S-32-alt")
    ckpt = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), ckpt)
    del model
    paths = sorted(images.rglob("*.png"))[:4]
    spec = spec_dict(paths[0].parent, "ViT-S-32-alt", tmp_path / "out",
                     model={"pretrained": str(ckpt), "precision": "fp32"},
                     labels={"classes": CLASSES, "templates": TEMPLATES}, output={"embedding_dtype": "float32"})
    spec["input"]["path"] = [str(p) for p in paths]
    assert clipbatch.run(spec).complete

    ref_model, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32-alt", pretrained=str(ckpt))
    ref_model.eval()
    rows = {r["source"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    with torch.no_grad():
        for path in paths:
            ref = ref_model.encode_image(preprocess(Image.open(path)).unsqueeze(0), normalize=True)[0].numpy()
            got = np.asarray(rows[str(path)]["embedding"], dtype=np.float32)
            assert float(got @ ref) >= 0.999


def test_checkpoints_load_without_a_wasted_random_init(tmp_path, tiny_model):
    """A model whose checkpoint overwrites every parameter skips open_clip's random init, and has
    exactly open_clip's weights and buffers; a local-dir without weights still gets the seeded random init."""
    import threading

    from clipbatch.models import _loading_checkpoint, load_model

    torch.manual_seed(5)
    ckpt = tmp_path / "ckpt.pt"
    torch.save(open_clip.create_model("ViT-S-32-alt").state_dict(), ckpt)
    for name, pretrained in [(tiny_model, None), ("ViT-S-32-alt", str(ckpt))]:
        ours = load_model(name, pretrained, device="cpu", precision="fp32").model.state_dict()
        theirs = open_clip.create_model(name, pretrained=pretrained).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name  # attn_mask (a buffer) included

    config_only = tmp_path / "no-weights"
    config_only.mkdir()
    (config_only / "open_clip_config.json").write_text((Path(tiny_model.removeprefix("local-dir:")) /
                                                        "open_clip_config.json").read_text())
    ours = load_model(f"local-dir:{config_only}", None, device="cpu", precision="fp32").model.state_dict()
    torch.manual_seed(0)
    theirs = open_clip.create_model(f"local-dir:{config_only}").state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    inside, beside, gate = torch.zeros(64), torch.zeros(64), threading.Barrier(2)

    def other_thread():
        gate.wait()
        torch.nn.init.normal_(beside)

    thread = threading.Thread(target=other_thread)
    thread.start()
    with _loading_checkpoint():
        gate.wait()
        torch.nn.init.normal_(inside)
        thread.join()
    assert not inside.any() and beside.any(), "skipped in the loading thread only"
    torch.nn.init.normal_(inside)
    assert inside.any(), "and only while loading"

    from torch.nn.modules import activation  # nn.MultiheadAttention binds xavier_uniform_ by name at import

    bound = torch.zeros(8, 8)
    with _loading_checkpoint():
        activation.xavier_uniform_(bound)
    assert not bound.any(), "skipped where a module imported the init function by name"


def test_checkpoint_tensors_are_taken_not_copied_and_keep_the_models_dtype(tmp_path, tiny_model):
    """A safetensors checkpoint's tensors become the model's own (memory-mapped, never copied), and
    each parameter keeps the dtype open_clip's copying load gives it: a float16 checkpoint loads
    as float32, and bf16 precision casts only the layers open_clip casts."""
    from clipbatch.models import load_model, save_local_dir

    ours = load_model(tiny_model, None, device="cpu", precision="fp32").model
    folder = Path(tiny_model.removeprefix("local-dir:"))
    checkpoint = folder / "open_clip_model.safetensors"
    mapped = [[int(x, 16) for x in line.split()[0].split("-")] for line in Path("/proc/self/maps").read_text()
              .splitlines() if line.endswith(str(checkpoint.resolve()))]
    assert all(any(lo <= p.data_ptr() < hi for lo, hi in mapped) for p in ours.parameters()), \
        "every parameter lies in the checkpoint's memory map"
    saved = open_clip.create_model(tiny_model)
    half = save_local_dir(saved, json.loads((folder / "open_clip_config.json").read_text())["model_cfg"],
                          tmp_path / "half", dtype="float16")
    for weights, precision in [(half, "fp32"), (half, "bf16"), (folder, "bf16")]:
        ours = load_model(f"local-dir:{weights}", None, device="cpu", precision=precision).model.state_dict()
        theirs = open_clip.create_model(f"local-dir:{weights}", precision=precision).state_dict()
        assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}, precision
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert {v.dtype for v in ours.values() if v.is_floating_point()} == {torch.float32, torch.bfloat16}


@pytest.mark.slow
def test_cli_run_with_text_head_in_driver_matches(images, tiny_model, tmp_path, library_run):
    """`clipbatch run` on a CPU machine with no Ray running starts Ray beside its checks and builds the
    text head in the driver while the encoder starts; its results equal those of clipbatch.run() in a
    Ray already running here (test_multinode compares a head built by a Ray task)."""
    import os
    import subprocess
    import sys

    import yaml

    (tmp_path / "job.yaml").write_text(yaml.safe_dump(library_spec(images, tiny_model, tmp_path / "cli")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "clipbatch.cli", "run", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, out = library_run(tiny_model)  # Ray is already running here
    assert summary.complete
    cli = pq.read_table(tmp_path / "cli").sort_by("id")
    lib = pq.read_table(out).sort_by("id")
    assert cli["id"].to_pylist() == lib["id"].to_pylist()
    np.testing.assert_allclose(np.stack(cli["scores"].to_numpy(zero_copy_only=False)),
                               np.stack(lib["scores"].to_numpy(zero_copy_only=False)), atol=1e-6)
