"""`clipbatch relabel`: new classes, templates or threshold over a finished output, from its stored
embeddings alone.

Every output row keeps its L2-normalized image embedding, so relabeling is one
matrix product per part with a new text head built by the same model: minutes
for millions of rows where rerunning the job would take a night. The new
output has the same columns and the same contract (parts, manifest, _SUCCESS);
ids, sources, sizes, errors, embeddings and carried columns are copied, the
label columns are recomputed by the same function the job's encoders use.
"""

from __future__ import annotations

import json
import posixpath
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import ValidationError

from clipbatch import __version__
from clipbatch.config import LabelsSpec, SpecError
from clipbatch.labels import build_text_head, class_probabilities, label_columns
from clipbatch.progress import ProgressCounter, ProgressReporter
from clipbatch.schema import output_schema, read_metadata
from clipbatch.outputs import MANIFEST, SUCCESS, OutputDir, write_part
from clipbatch.stored import StoredOutput, embeddings_of
from clipbatch.templates import resolve_prompts

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
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "labels"
        raise SpecError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None


class Relabel:
    """A checked relabel: source output opened, new labels resolved, target checked."""

    def __init__(self, source: str, out: str, classes: list[str] | None = None, classes_file: str | None = None,
                 templates: list[str] | None = None, min_score: float | None = None, unknown: str | None = None,
                 top_k: int | None = None, storage_options: dict | None = None,
                 out_storage_options: dict | None = None):
        storage_options = storage_options or {}
        self.stored = StoredOutput(source, storage_options)
        self.stored.require_embeddings("relabel")
        if not self.stored.complete:
            raise SpecError(f"{self.stored.url} is not complete (no {SUCCESS}); finish its job first "
                            "(rerun `clipbatch run` with the same spec)")
        meta = self.stored.metadata
        self.labels = _labels_spec(classes, classes_file, templates, meta["templates"],
                                   top_k or self._stored_top_k(), min_score, unknown, meta.get("temperature", 1.0))
        self.prompts = resolve_prompts(self.labels, storage_options)
        self.classes, self.templates = self.prompts.names, self.prompts.templates
        self.out = OutputDir(out, out_storage_options if out_storage_options is not None else storage_options)
        if self.out.url == self.stored.url:
            raise SpecError("--out must be a new output path, not the output being relabeled")
        self.fingerprint = {**meta.get("fingerprint", {}), "classes": self.classes, "templates": self.templates,
                            "prompts": self.prompts.digest(), "min_score": min_score, "unknown": unknown}

    def _stored_top_k(self) -> int:
        """The source's top_k (the longest top_labels list of its first part), kept unless --top-k is given."""
        lengths = pc.list_value_length(self.stored.read_part(self.stored.parts[0], ["top_labels"])["top_labels"])
        return max(1, pc.max(lengths).as_py() or 1)

    def _parts_to_do(self) -> list[str] | None:
        """None when the target is already complete; refuses a target that holds other results."""
        existing = self.out.parts()
        if existing:
            earlier = read_metadata(pq.read_schema(existing[0], filesystem=self.out.fs)).get("fingerprint")
            if earlier != self.fingerprint:
                raise SpecError(f"{self.out.url} already holds other results; choose another --out")
            if self.out.exists(SUCCESS):
                return None
        for leftover in self.out.leftovers():
            self.out.fs.rm_file(leftover)
        done = {posixpath.basename(p) for p in existing}
        return [p for p in self.stored.parts if posixpath.basename(p) not in done]

    def run(self) -> RelabelSummary:
        started = time.time()
        self.out.check_writable()
        todo = self._parts_to_do()
        if todo is None:
            _, rows, errors = self.out.announce_complete()
            return RelabelSummary(self.out.url, rows, errors, 0.0, 0.0, skipped=True)
        members = []
        for member in self.stored.members:
            loaded = self.stored.load_model(member, device="cpu")
            head = build_text_head(loaded, self.prompts.prompts)
            self.out.write_head(head, member["embedding_column"])
            members.append(_ScoredMember(member["embedding_column"], torch.from_numpy(head), loaded.logit_scale,
                                         loaded.logit_bias, member["weight"]))
            del loaded
        meta = self.stored.metadata
        metadata = {**meta, "clipbatch_version": __version__, "classes": self.classes,
                    "templates": self.templates, "templates_name": self.prompts.templates_name,
                    "custom_prompts": self.prompts.custom, "min_score": self.labels.min_score,
                    "unknown": self.labels.unknown, "fingerprint": self.fingerprint,
                    "relabeled_from": self.stored.url}
        dims = {m.column: m.text_head.shape[1] for m in members}
        schema = output_schema(len(self.classes), dims, self.stored.embedding_dtype, metadata, self.stored.carried)
        scorer = _PartScorer(members, pa.array(self.classes, pa.string()), self.labels.top_k,
                             self.labels.min_score, self.labels.unknown, self.labels.temperature, schema)
        counts = ProgressCounter()
        begun = time.time()
        with ProgressReporter(counts.read, self.stored.count_rows(todo), unit="rows"):
            with ThreadPoolExecutor(RELABEL_THREADS) as pool:
                for rows, errors in pool.map(lambda p: self._relabel_part(p, scorer), todo):
                    counts.add(rows, errors)  # in this thread: pool.map hands results back here
        return self._finish(started, begun)

    def _relabel_part(self, part: str, scorer: "_PartScorer") -> tuple[int, int]:
        table = scorer(self.stored.read_part(part))
        write_part(self.out, table, posixpath.basename(part))
        return table.num_rows, table.num_rows - table["error"].null_count

    def _finish(self, started: float, begun: float) -> RelabelSummary:
        written = self.out.written_rows()
        source_rows = self.stored.count_rows()
        errors = written.num_rows - written["error"].null_count
        complete = written.num_rows == source_rows and len(self.out.parts()) == len(self.stored.parts)
        seconds = time.time() - started
        manifest = {**self.stored.manifest, **{k: v for k, v in self.stored.metadata.items() if k != "fingerprint"},
                    "clipbatch_version": __version__, "classes": self.classes, "templates": self.templates,
                    "min_score": self.labels.min_score, "unknown": self.labels.unknown,
                    "relabeled_from": self.stored.url, "output": self.out.url,
                    "counts": {"rows": written.num_rows, "errors": errors},
                    "timings": {"relabel_s": round(time.time() - begun, 3), "total_s": round(seconds, 3)},
                    "parts": [posixpath.basename(p) for p in self.out.parts()], "fingerprint": self.fingerprint,
                    "complete": complete, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        manifest.pop("compute", None)
        manifest.pop("ray", None)
        self.out.write_text(MANIFEST, json.dumps(manifest, indent=2))
        if complete:
            self.out.write_text(SUCCESS, "")
        return RelabelSummary(self.out.url, written.num_rows, errors, seconds,
                              written.num_rows / max(time.time() - begun, 1e-9))


@dataclass
class _ScoredMember:
    """One model of the output (one for a single-model job): its new head and its weight."""

    column: str  # its embedding column
    text_head: torch.Tensor
    logit_scale: float
    logit_bias: float | None
    weight: float


@dataclass
class _PartScorer:
    """One part's rows -> the same rows with the label columns recomputed from their embeddings,
    by the rule the job's encoders use (an ensemble: the weighted mean of its models' probabilities)."""

    members: list[_ScoredMember]
    classes: pa.Array
    top_k: int
    min_score: float | None
    unknown: str | None
    temperature: float
    schema: pa.Schema

    def __call__(self, table: pa.Table) -> pa.Table:
        total = sum(m.weight for m in self.members)
        probs, valid = 0, None
        for member in self.members:
            stored, valid = embeddings_of(table, member.column)
            with warnings.catch_warnings():  # read-only Arrow memory: torch only reads it, to convert
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                embeddings = torch.from_numpy(stored).float()
            probs = probs + member.weight / total * class_probabilities(
                embeddings @ member.text_head.T, member.logit_scale, member.logit_bias, self.temperature)
        columns = label_columns(probs, valid, self.classes, self.top_k, self.min_score, self.unknown)
        for name, values in columns.items():
            table = table.set_column(table.schema.get_field_index(name), name, values)
        return table.cast(self.schema)
