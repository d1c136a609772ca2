"""clipbatch's results against open_clip's own reference pipeline, in fp32 on CPU."""

from __future__ import annotations


import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import clipbatch
from conftest import CLASSES, TEMPLATES, spec_dict


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
