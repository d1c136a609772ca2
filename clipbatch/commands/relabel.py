"""`clipbatch relabel`: new classes, templates or threshold over a finished output, from its stored
embeddings alone.

Every output row keeps its L2-normalized image embedding, so relabeling is one
matrix product per part with a new text head built by the same model: minutes
for millions of rows where rerunning the job would take a night. The new
output has the same columns and the same contract (parts, manifest, _SUCCESS);
ids, sources, sizes, errors, embeddings and carried columns are copied, the
label columns are recomputed by the same functions the job's encoders use.
"""

from __future__ import annotations

import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from clipbatch.errors import UserError
from clipbatch.model.members import Member
from clipbatch.model.prompts import resolve_prompts
from clipbatch.model.scoring import Labeling, label_columns, logits, mix
from clipbatch.model.text_head import build_heads
from clipbatch.output import resume
from clipbatch.output.finish import error_count, finish
from clipbatch.output.layout import SUCCESS, OutputDir, write_part
from clipbatch.output.reader import OutputReader, embeddings_of
from clipbatch.output.schema import output_schema
from clipbatch.pipeline.progress import ProgressCounter, ProgressReporter
from clipbatch.spec import LabelsSpec, format_error

RELABEL_THREADS = 2  # Parquet decode/encode and the matrix products release the GIL


@dataclass
class RelabelSummary:
    output: str
    rows: int
    errors: int
    seconds: float
    rows_per_s: float
    skipped: bool = False


def _labels_spec(classes: list[str] | None, classes_file: str | None, templates: list[str] | None,
                 stored_templates: list[str], top_k: int, min_score: float | None, unknown: str | None,
                 temperature: float) -> LabelsSpec:
    """The new labels, checked by the same rules as a job spec's labels section."""
    if templates and len(templates) == 1 and "{}" not in templates[0]:
        chosen: str | list[str] = templates[0]  # a built-in set's name
    else:
        chosen = templates or stored_templates
    try:
        return LabelsSpec(classes=classes, classes_file=classes_file, templates=chosen, top_k=top_k,
                          min_score=min_score, unknown=unknown, temperature=temperature)
    except ValidationError as exc:
        raise UserError(f"labels.{format_error(exc)}") from None


class Relabel:
    """A checked relabel: source output opened, new labels resolved, target checked."""

    def __init__(self, source: str, out: str, classes: list[str] | None = None, classes_file: str | None = None,
                 templates: list[str] | None = None, min_score: float | None = None, unknown: str | None = None,
                 top_k: int | None = None, storage_options: dict | None = None,
                 out_storage_options: dict | None = None):
        storage_options = storage_options or {}
        self.stored = OutputReader(source, storage_options)
        self.stored.require_embeddings("relabel")
        if not self.stored.complete:
            raise UserError(f"{self.stored.url} is not complete (no {SUCCESS}); finish its job first "
                            "(rerun `clipbatch run` with the same spec)")
        meta = self.stored.metadata
        labels = _labels_spec(classes, classes_file, templates, meta["templates"], top_k or self._stored_top_k(),
                              min_score, unknown, meta.get("temperature", 1.0))
        self.prompts = resolve_prompts(labels, storage_options)
        self.labeling = Labeling.from_spec(labels, self.prompts.names)
        self.out = OutputDir(out, out_storage_options if out_storage_options is not None else storage_options)
        if self.out.url == self.stored.url:
            raise UserError("--out must be a new output path, not the output being relabeled")
        self.fingerprint = {**meta.get("fingerprint", {}), "classes": self.prompts.names,
                            "templates": self.prompts.templates, "prompts": self.prompts.digest(),
                            "min_score": min_score, "unknown": unknown}

    def describe(self) -> str:
        models = ", ".join(m.name for m in self.stored.members)
        return (f"clipbatch: relabeling {self.stored.url} with {len(self.prompts.names)} classes x "
                f"{len(self.prompts.templates)} templates (model {models}) into {self.out.url}")

    def _stored_top_k(self) -> int:
        """The source's top_k (the longest top_labels list of its first part), kept unless --top-k is given."""
        lengths = pc.list_value_length(self.stored.read_part(self.stored.parts[0], ["top_labels"])["top_labels"])
        return max(1, pc.max(lengths).as_py() or 1)

    def run(self) -> RelabelSummary:
        started = time.time()
        self.out.check_writable()
        if resume.check(self.out, self.fingerprint, advice="choose another --out"):
            _, rows, errors = self.out.announce_complete()
            return RelabelSummary(self.out.url, rows, errors, 0.0, 0.0, skipped=True)
        done = {posixpath.basename(p) for p in self.out.parts()}
        todo = [p for p in self.stored.parts if posixpath.basename(p) not in done]
        members, heads = build_heads(self.stored.members, self.prompts.prompts,
                                     load=lambda member: self.stored.load_model(member, device="cpu"))
        metadata = {**self.stored.metadata, "classes": self.prompts.names, "templates": self.prompts.templates,
                    "templates_name": self.prompts.templates_name, "custom_prompts": self.prompts.custom,
                    "min_score": self.labeling.min_score, "unknown": self.labeling.unknown,
                    "fingerprint": self.fingerprint, "relabeled_from": self.stored.url}
        schema = output_schema(len(self.prompts.names), {m.column: h.shape[1] for m, h in zip(members, heads)},
                               self.stored.embedding_dtype, metadata, self.stored.carried)
        score = PartScorer(members, heads, self.labeling, schema)
        counts = ProgressCounter()
        begun = time.time()
        with ProgressReporter(counts.read, self.stored.count_rows(todo), unit="rows"):
            with ThreadPoolExecutor(RELABEL_THREADS) as pool:
                for rows, errors in pool.map(lambda p: self._relabel_part(p, score), todo):
                    counts.add(rows, errors)  # in this thread: pool.map hands results back here
        written = self.out.written_rows()
        complete = written.num_rows == self.stored.count_rows() and len(self.out.parts()) == len(self.stored.parts)
        seconds = time.time() - started
        fields = {k: v for k, v in self.stored.manifest.items() if k not in ("compute", "ray")}
        fields.update(counts={"rows": written.num_rows, "errors": error_count(written)},
                      timings={"total_s": round(seconds, 3)})
        finish(self.out, metadata, {m.column: h for m, h in zip(members, heads)}, fields, complete)
        return RelabelSummary(self.out.url, written.num_rows, error_count(written), seconds,
                              written.num_rows / max(time.time() - begun, 1e-9))

    def _relabel_part(self, part: str, score: "PartScorer") -> tuple[int, int]:
        table = score(self.stored.read_part(part))
        write_part(self.out, table, posixpath.basename(part))
        return table.num_rows, error_count(table)


@dataclass
class PartScorer:
    """One part's rows -> the same rows with the label columns recomputed from their embeddings,
    by the rule the job's encoders use (an ensemble: the weighted mean of its models' probabilities)."""

    members: list[Member]
    heads: list[np.ndarray]
    labeling: Labeling
    schema: pa.Schema

    def __call__(self, table: pa.Table) -> pa.Table:
        member_logits, valid = [], None
        for member, head in zip(self.members, self.heads):
            stored, valid = embeddings_of(table, member.column)
            member_logits.append(logits(stored.astype(np.float32) @ head.T, member))
        columns = label_columns(mix(member_logits, self.members, self.labeling.temperature), valid, self.labeling)
        for name, values in columns.items():
            table = table.set_column(table.schema.get_field_index(name), name, values)
        return table.cast(self.schema)
