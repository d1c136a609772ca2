"""`clipbatch eval`: a job's output against ground truth: metrics.json, plots, calibration, template sets.

Eval never reads an image itself: it runs the job if its output is not complete
and then works from the output alone (scores, the stored L2-normalized
embeddings and ``_text_head.npy``). Comparing template sets therefore costs one
text head per set and a matrix product, not another pass over the images.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import posixpath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from clipbatch.commands import charts
from clipbatch.commands.metrics import (calibration_bins, classification_report, expected_calibration_error,
                                        fit_temperature, negative_log_likelihood)
from clipbatch.errors import UserError
from clipbatch.model.members import Member, current_metadata, members_from_metadata
from clipbatch.model.prompts import resolve_prompts, template_set_names
from clipbatch.model.scoring import logits, mix
from clipbatch.model.text_head import build_text_head
from clipbatch.output.layout import SUCCESS, OutputDir
from clipbatch.output.schema import matrix
from clipbatch.pipeline.job import Job, build
from clipbatch.spec import LabelsSpec

EVAL_DIR = "_eval"  # "_": Parquet readers (pyarrow datasets, Spark) skip it when reading OUTPUT as a table


def read_truth_file(url: str, storage_options: dict | None = None) -> dict[str, str]:
    """id -> label from a CSV (with a header) or Parquet file that has columns id and label."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"--truth: {url} not found") from None
    if url.lower().endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
    else:
        table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
            column_types={"id": pa.string(), "label": pa.string()}))
    if not {"id", "label"} <= set(table.column_names):
        raise UserError(f"--truth: {url} needs columns id and label (it has {', '.join(table.column_names)})")
    return dict(zip(table["id"].cast(pa.string()).to_pylist(), table["label"].cast(pa.string()).to_pylist()))


def truth_for(table: pa.Table, job: Job, truth_file: str | None, truth_column: str | None) -> tuple[list, str]:
    """The true label of every output row (None where unknown) and where it came from."""
    ids = table["id"].to_pylist()
    if truth_file:
        truth = read_truth_file(truth_file, job.spec.input.storage_options)
        return [truth.get(i) for i in ids], f"file:{truth_file}"
    if truth_column:
        if truth_column not in table.column_names:
            raise UserError(f"--truth-column: the output has no column '{truth_column}'; carry it from the "
                            f"input with input.keep: [{truth_column}]")
        return table[truth_column].cast(pa.string()).to_pylist(), f"column:{truth_column}"
    if job.format != "images":
        raise UserError(f"a {job.format} input has no folder layout to take classes from; give --truth FILE "
                        "or --truth-column COLUMN")
    return [i.split("/", 1)[0] if "/" in i else None for i in ids], "folders"


def _labeled(table: pa.Table, truth_labels: list, classes: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(rows to score, their true class indices, what was left out and why): error rows, rows
    without a truth, and rows whose true class is not one of the job's classes."""
    index = {c: i for i, c in enumerate(classes)}
    ok = pc.is_null(table["error"]).to_numpy(zero_copy_only=False)
    outside: dict[str, int] = {}
    for t, good in zip(truth_labels, ok):
        if good and t is not None and t not in index:
            outside[t] = outside.get(t, 0) + 1
    keep = ok & np.array([t in index for t in truth_labels], bool)
    truth = np.array([index[t] for t, k in zip(truth_labels, keep) if k], dtype=np.int64)
    missing = int(sum(good and t is None for t, good in zip(truth_labels, ok)))
    return keep, truth, {"errors": int((~ok).sum()), "no_truth": missing, "truth_not_in_classes": outside}


def _labels_with_templates(labels: LabelsSpec, name: str) -> LabelsSpec:
    """The job's labels (classes, synonyms, prompts_file) with another template set: a built-in
    name, a templates file, or FILE#SET for one set of a file of named sets."""
    kept = labels.model_dump(exclude={"templates", "templates_file"}, exclude_unset=True)
    if name in template_set_names():
        return LabelsSpec(**kept, templates=name)
    path, _, chosen = name.partition("#")
    return LabelsSpec(**kept, templates_file=path, **({"templates": chosen} if chosen else {}))


def _member_logits(embeddings: dict[str, np.ndarray], heads: dict[str, np.ndarray], members: list[Member]) -> list:
    """Each member's logits from the stored (L2-normalized) embeddings, in float64: no image is read."""
    return [logits(embeddings[m.column].astype(np.float64) @ heads[m.column].T.astype(np.float64), m)
            for m in members]


def calibrate(scores: np.ndarray, embeddings: dict | None, heads: dict | None, truth: np.ndarray,
              manifest: dict) -> dict:
    """One temperature, fitted by NLL on the labeled rows, for labels.temperature.

    The logits come from the stored embeddings x saved heads (exact up to fp16 storage; for an
    ensemble the temperature divides every model's logits before their probabilities are mixed,
    as labels.temperature does). Without embeddings they are recovered from the stored
    probabilities (T0 * log p, with p clipped at 1e-30), which is exact for one model.
    """
    members, t0 = members_from_metadata(manifest), manifest.get("temperature", 1.0)
    if embeddings is not None:
        z, source = _member_logits(embeddings, heads, members), "embeddings"
    else:
        p = np.clip(scores.astype(np.float64), 1e-30, 1 - 1e-7)
        sigmoid = members[0].logit_bias is not None
        z, source = [t0 * (np.log(p / (1 - p)) if sigmoid else np.log(p))], "scores"
        members = [dataclasses.replace(members[0], weight=1.0)]
    sigmoid = all(m.logit_bias is not None for m in members)

    def nll(t: float) -> float:
        return negative_log_likelihood(mix(z, members, t), truth, sigmoid)

    fitted = fit_temperature(nll)
    before, after = mix(z, members, t0), mix(z, members, fitted)

    def ece(p):
        return expected_calibration_error(p.max(1), p.argmax(1) == truth)

    return {"temperature": fitted, "fitted_factor": fitted / t0, "logits_from": source,
            "ece_before": ece(before), "ece_after": ece(after), "nll_before": nll(t0), "nll_after": nll(fitted),
            "reliability_after": calibration_bins(after.max(1), after.argmax(1) == truth)}


def compare_templates(job, names: list[str], embeddings: dict, truth: np.ndarray, manifest: dict,
                      stored_scores: np.ndarray, stored_heads: dict) -> dict:
    """Accuracy per template set from the stored embeddings: one text head per set and model,
    no image read."""
    members, t0 = members_from_metadata(manifest), manifest.get("temperature", 1.0)
    rescored = mix(_member_logits(embeddings, stored_heads, members), members, t0)
    results = {"_job": {"templates": manifest.get("templates_name", "custom"),
                        "max_abs_diff_vs_stored_scores": float(np.abs(rescored - stored_scores).max())}}
    loaded = [m.load("auto") for m in members]
    for name in names:
        prompts = resolve_prompts(_labels_with_templates(job.spec.labels, name), job.spec.input.storage_options)
        if prompts.names != job.prompts.names:
            raise UserError(f"--templates {name}: changes the classes")
        heads = {m.column: build_text_head(model, prompts.prompts) for m, model in zip(members, loaded)}
        scores = mix(_member_logits(embeddings, heads, members), members, t0)
        report = classification_report(scores, truth, job.prompts.names)
        results[name] = {k: report[k] for k in ("top1", "top5", "mean_per_class_recall", "ece")}
        results[name]["templates"] = len(prompts.templates)
    return results


def evaluate(spec, overrides: dict | None = None, truth_file: str | None = None, truth_column: str | None = None,
             calibrate_temperature: bool = False, template_sets: list[str] = ()) -> dict:
    """Run the job if needed, score its output against the truth, write OUTPUT/_eval/; returns metrics."""
    job = build(spec, overrides)
    if not job.out.exists(SUCCESS):
        summary = job.run()
        if not summary.complete:
            raise UserError(f"{job.out.url} is still incomplete after the run; rerun to finish it first")
    manifest = current_metadata(job.out.read_manifest())
    classes = manifest["classes"]
    emb_columns = [m.column for m in members_from_metadata(manifest)]
    names = pq.read_schema(job.out.parts()[0], filesystem=job.out.fs).names
    stored = all(c in names for c in emb_columns) and (bool(template_sets) or calibrate_temperature)
    columns = ["id", "scores", "error"] + (emb_columns if stored else []) \
        + ([truth_column] if truth_column and truth_column in names else [])
    table = job.out.read(columns)
    truth_labels, truth_source = truth_for(table, job, truth_file, truth_column)
    keep, truth, excluded = _labeled(table, truth_labels, classes)
    if not keep.any():
        raise UserError(f"no output row has a true label among the job's classes (truth from {truth_source})")
    used = table.filter(pa.array(keep))
    scores = matrix(used["scores"], np.float64)
    metrics = classification_report(scores, truth, classes)
    metrics.update({
        "classes": classes, "truth": truth_source,
        "models": manifest["models"],
        "templates": manifest.get("templates"), "templates_name": manifest.get("templates_name"),
        "temperature": manifest.get("temperature", 1.0), "output": job.out.url,
        "excluded": excluded})
    if manifest.get("min_score") is not None:
        covered = scores.max(1) >= manifest["min_score"]
        metrics["min_score"] = {"threshold": manifest["min_score"], "coverage": float(covered.mean()),
                                "top1_of_covered": float((scores.argmax(1) == truth)[covered].mean())
                                if covered.any() else None}
    if template_sets and not stored:
        raise UserError("--templates rescoring needs stored embeddings (output.embeddings: true)")
    embeddings = {c: matrix(used[c]) for c in emb_columns} if stored else None
    heads = {c: job.out.read_head(c) for c in emb_columns} if stored else None
    if calibrate_temperature:
        metrics["calibration"] = calibrate(scores, embeddings, heads, truth, manifest)
    if template_sets:
        metrics["template_sets"] = compare_templates(job, list(template_sets), embeddings, truth, manifest, scores,
                                                     heads)
    write_eval(job.out, metrics)
    return metrics


def write_eval(out: OutputDir, metrics: dict) -> None:
    """metrics.json and three PNG charts under OUTPUT/_eval/ (any fsspec store)."""

    classes = metrics["classes"]
    out.write_text(posixpath.join(EVAL_DIR, "metrics.json"), json.dumps(metrics, indent=2))
    out.write_bytes(posixpath.join(EVAL_DIR, "confusion.png"),
                    charts.confusion(np.array(metrics["confusion"]), classes))
    curves = {"model": metrics["reliability"]}
    if "calibration" in metrics:
        curves[f"T = {metrics['calibration']['temperature']:.3g}"] = metrics["calibration"]["reliability_after"]
    out.write_bytes(posixpath.join(EVAL_DIR, "reliability.png"), charts.reliability(curves))
    out.write_bytes(posixpath.join(EVAL_DIR, "per_class_recall.png"),
                    charts.bars(classes, [metrics["per_class"][c]["recall"] for c in classes],
                                "recall per class", "recall", ylim=(0, 1)))


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def print_metrics(m: dict) -> None:
    print(f"\nclipbatch eval: {m['n']:,} labeled images, {len(m['classes'])} classes (truth from {m['truth']}; "
          f"excluded {m['excluded']['errors']} error rows, {m['excluded']['no_truth']} without truth, "
          f"{sum(m['excluded']['truth_not_in_classes'].values())} with a true class outside the classes)")
    print(f"top-1 {_pct(m['top1'])}   top-5 {_pct(m['top5'])}   mean per-class recall "
          f"{_pct(m['mean_per_class_recall'])}   ECE {m['ece']:.4f}")
    worst = sorted(m["per_class"].items(), key=lambda kv: (kv[1]["recall"], kv[0]))[:5]
    print("lowest recall  " + ", ".join(f"{c} {_pct(v['recall'])} (n={v['n']})" for c, v in worst))
    if "min_score" in m:
        ms = m["min_score"]
        print(f"min_score {ms['threshold']}: coverage {_pct(ms['coverage'])}, top-1 of covered "
              f"{_pct(ms['top1_of_covered'])}")
    if "calibration" in m:
        c = m["calibration"]
        print(f"calibration    temperature {c['temperature']:.4f} (labels.temperature for later jobs); ECE "
              f"{c['ece_before']:.4f} -> {c['ece_after']:.4f}, NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}")
    if "template_sets" in m:
        sets = {k: v for k, v in m["template_sets"].items() if k != "_job"}
        width = max(len(k) for k in sets) + 2
        print(f"\n{'templates':<{width}}{'n':>5}{'top-1':>9}{'top-5':>9}{'mpcr':>9}{'ECE':>9}")
        for name, r in sets.items():
            print(f"{name:<{width}}{r['templates']:>5}{_pct(r['top1']):>9}{_pct(r['top5']):>9}"
                  f"{_pct(r['mean_per_class_recall']):>9}{r['ece']:>9.4f}")
        print(f"(from stored embeddings; rescoring the job's own head differs from the stored scores by at "
              f"most {m['template_sets']['_job']['max_abs_diff_vs_stored_scores']:.1e})")
    print(f"written        {m['output']}/{EVAL_DIR}/metrics.json, confusion.png, reliability.png, "
          "per_class_recall.png", flush=True)
