"""`clipbatch eval` end to end on labeled folders drawn by the demo world, with the bundled model."""

from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from clipbatch.cli import main
from clipbatch.commands import demo_world as world
from clipbatch.commands.demo import write_images
from clipbatch.commands.evaluate import calibrate
from clipbatch.commands.metrics import negative_log_likelihood
from clipbatch.model.scoring import probabilities
from clipbatch.model.load import load_model
from clipbatch.output.schema import matrix


def demo_spec(input_path, out, **input_extra) -> dict:
    return {"name": "eval-test", "input": {"path": str(input_path), **input_extra},
            "model": {"name": "clipbatch-demo"},
            "labels": {"classes": list(world.CLASSES), "templates": list(world.DEMO_TEMPLATES)},
            "output": {"path": str(out)}}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, ray_local):
    """72 labeled pictures, one broken file and one picture of a class the job does not know."""
    root = tmp_path_factory.mktemp("eval")
    images = root / "images"
    write_images(images, 72, world.DEMO_SEED)
    (images / "bad").mkdir()
    (images / "bad" / "broken.png").write_bytes(b"not a png")
    (images / "misc").mkdir()
    next(world.sample(5, 1, ["red circle"]))[0].save(images / "misc" / "extra.png")
    spec = root / "job.yaml"
    spec.write_text(yaml.safe_dump(demo_spec(images, root / "out")))
    templates = root / "one.txt"
    templates.write_text("an illustration of a {}.\n")
    assert main(["eval", str(spec), "--calibrate", "--templates", "simple", "--templates", str(templates)]) == 0
    return root, spec, json.loads((root / "out" / "_eval" / "metrics.json").read_text())


def test_metrics_match_the_output(evaluated):
    root, _, m = evaluated
    table = pq.read_table(root / "out").to_pylist()
    labeled = [r for r in table if r["error"] is None and r["id"].split("/")[0] in world.CLASSES]
    right = sum(r["label"] == r["id"].split("/")[0] for r in labeled)
    assert m["n"] == len(labeled) == 72 and m["top1"] == m["acc1"] == pytest.approx(right / 72)
    assert m["excluded"] == {"errors": 1, "no_truth": 0, "truth_not_in_classes": {"misc": 1}}
    confusion = np.array(m["confusion"])
    assert confusion.shape == (36, 36) and confusion.sum() == 72 and np.trace(confusion) == right
    assert all(m["per_class"][c]["n"] == 2 for c in world.CLASSES) and m["classes"] == world.CLASSES
    assert m["top5"] == m["acc5"] and right / 72 <= m["top5"] <= 1.0
    assert m["mean_per_class_recall"] == pytest.approx(np.mean([v["recall"] for v in m["per_class"].values()]))
    assert 0 <= m["ece"] <= 1 and m["models"][0]["model"] == "clipbatch-demo"
    assert m["templates"] == world.DEMO_TEMPLATES and m["truth"] == "folders"
    for name in ("confusion.png", "reliability.png", "per_class_recall.png"):
        with Image.open(root / "out" / "_eval" / name) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 300


def test_calibration_lowers_nll(evaluated):
    root, _, m = evaluated
    c = m["calibration"]
    assert c["logits_from"] == "embeddings" and c["temperature"] == pytest.approx(c["fitted_factor"])
    assert c["nll_after"] <= c["nll_before"]
    table = pq.read_table(root / "out")
    ok = table.filter(pa.compute.is_null(table["error"]))
    keep = np.array([i.split("/")[0] in world.CLASSES for i in ok["id"].to_pylist()])
    emb = matrix(ok["embedding"])[keep]
    truth = np.array([world.CLASSES.index(i.split("/")[0]) for i in ok["id"].to_pylist() if
                      i.split("/")[0] in world.CLASSES])
    head = np.load(root / "out" / "_text_head.npy")
    logits = m["models"][0]["logit_scale"] * emb.astype(np.float64) @ head.T
    t = c["temperature"]

    def nll(temperature):
        return negative_log_likelihood(probabilities(logits, False, temperature), truth, False)

    assert nll(t) == pytest.approx(c["nll_after"], rel=1e-6) and nll(1.0) == pytest.approx(c["nll_before"], rel=1e-6)
    for other in (t * 1.05, t / 1.05):  # a minimum
        assert nll(other) > c["nll_after"]
    # without stored embeddings the logits come from the stored probabilities: the same temperature
    manifest = json.loads((root / "out" / "_manifest.json").read_text())
    from_scores = calibrate(matrix(ok["scores"])[keep], None, None, truth, manifest)
    assert from_scores["logits_from"] == "scores" and from_scores["temperature"] == pytest.approx(t, rel=0.02)


def test_template_sets_match_direct_computation(evaluated, capsys):
    root, spec, m = evaluated
    sets = m["template_sets"]
    assert set(sets) == {"_job", "simple", str(root / "one.txt")}
    assert sets["_job"]["max_abs_diff_vs_stored_scores"] < 1e-3  # fp16 embeddings
    loaded = load_model("clipbatch-demo", None, device="cpu")
    head = open_clip.build_zero_shot_classifier(loaded.model, loaded.tokenizer, world.CLASSES,
                                                ["a photo of a {}."], device="cpu").T.numpy()
    table = pq.read_table(root / "out")
    ok = table.filter(pa.compute.is_null(table["error"]))
    ids = ok["id"].to_pylist()
    keep = np.array([i.split("/")[0] in world.CLASSES for i in ids])
    predicted = (matrix(ok["embedding"])[keep] @ head.T).argmax(1)
    truth = np.array([world.CLASSES.index(i.split("/")[0]) for i in np.array(ids)[keep]])
    assert sets["simple"]["top1"] == pytest.approx((predicted == truth).mean())
    assert sets["simple"]["templates"] == 1 and 0 < sets[str(root / "one.txt")]["top1"] <= 1


def test_truth_files_and_no_second_run(evaluated, tmp_path):
    root, spec, _ = evaluated
    parts = {p: p.stat().st_mtime_ns for p in (root / "out").glob("part-*.parquet")}
    ids = sorted(pq.read_table(root / "out", columns=["id"])["id"].to_pylist())
    chosen = [i for i in ids if i.startswith(("red ", "blue "))]
    # one deliberately wrong truth label: whatever the model says, that row cannot be right
    rows = [(i, i.split("/")[0]) for i in chosen]
    rows[0] = (rows[0][0], "green ring")
    csv = tmp_path / "truth.csv"
    csv.write_text("id,label\n" + "".join(f'"{i}",{label}\n' for i, label in rows))
    assert main(["eval", str(spec), "--truth", str(csv)]) == 0
    m = json.loads((root / "out" / "_eval" / "metrics.json").read_text())
    assert m["n"] == len(chosen) == 24 and m["truth"] == f"file:{csv}"
    assert m["per_class"]["green ring"]["n"] == 1 and m["per_class"]["green circle"]["n"] == 0
    parquet = tmp_path / "truth.parquet"
    pq.write_table(pa.table({"id": [i for i, _ in rows], "label": [label for _, label in rows]}), parquet)
    assert main(["eval", str(spec), "--truth", str(parquet)]) == 0
    again = json.loads((root / "out" / "_eval" / "metrics.json").read_text())
    assert again["confusion"] == m["confusion"] and again["top1"] == m["top1"]
    assert {p: p.stat().st_mtime_ns for p in (root / "out").glob("part-*.parquet")} == parts


def test_truth_from_a_parquet_input_column(tmp_path, ray_local, capsys):
    images, labels = [], []
    for img, name in world.sample(world.DEMO_SEED, 1):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        images.append(buf.getvalue())
        labels.append(name)
    pq.write_table(pa.table({"image": images, "truth": labels}), tmp_path / "shapes.parquet")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(demo_spec(tmp_path / "shapes.parquet", tmp_path / "out", keep=["truth"])))
    assert main(["eval", str(spec), "--truth-column", "truth"]) == 0
    m = json.loads((tmp_path / "out" / "_eval" / "metrics.json").read_text())
    table = pq.read_table(tmp_path / "out", columns=["label", "truth"])
    right = sum(a == b for a, b in zip(table["label"].to_pylist(), table["truth"].to_pylist()))
    assert m["n"] == 36 and m["top1"] == pytest.approx(right / 36) and m["truth"] == "column:truth"
    assert "top-1" in capsys.readouterr().out
    assert main(["eval", str(spec)]) == 2  # a parquet input has no folders to take classes from
