"""Job spec: the YAML a user writes, validated by pydantic, and ``--set`` overrides.

Pure: no torch, no open_clip, no I/O beyond reading the spec file itself.
Everything that can be wrong with a spec on its own (unknown keys, missing
classes, templates without ``{}``, secrets in storage_options) is caught here;
what needs a model or a file (an unknown model name, a classes_file) is checked
when the job is built (``pipeline.job.build``), still before any work.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from clipbatch.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Keys that would put a secret into a spec; credentials come from the environment.
_SECRET_OPTION_KEYS = {"key", "secret", "token", "password", "aws_access_key_id",
                       "aws_secret_access_key", "aws_session_token", "access_key", "secret_key"}


def _reject_secrets(options: dict[str, Any]) -> dict[str, Any]:
    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if str(k).lower() in _SECRET_OPTION_KEYS:
                    raise ValueError(f"'{where}{k}' looks like a credential; credentials come from the "
                                     "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, profiles), "
                                     "never from a spec")
                walk(v, f"{where}{k}.")
    walk(options, "")
    return options


StorageOptions = Annotated[dict[str, Any], AfterValidator(_reject_secrets)]


class InputSpec(_Strict):
    path: Union[str, list[str]]
    format: Literal["auto", "images", "webdataset", "parquet"] = "auto"
    image_column: str = "image"
    id_column: str | None = None
    keep: list[str] = Field(default_factory=list)
    jpeg_draft: bool = False
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    max_pixels: int = Field(100_000_000, ge=1)
    storage_options: StorageOptions = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("must name at least one path")
        return v


class ModelSpec(_Strict):
    name: str
    pretrained: str | None = None
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"


class MemberSpec(ModelSpec):
    """One model of an ensemble (``models:``): its probabilities count with ``weight``, and its
    embedding is written to column ``embedding_<key>``."""

    weight: float = Field(1.0, gt=0)
    key: str | None = None

    @field_validator("key")
    @classmethod
    def _key_is_a_name(cls, v):
        if v is not None and not re.fullmatch(r"[a-z0-9_]+", v):
            raise ValueError("must be lowercase letters, digits and _ (it names the column embedding_<key>)")
        return v

    @property
    def column_key(self) -> str:
        """key, or one made from the model's name and pretrained tag: ViT-B-32 + openai -> vit_b_32_openai."""
        if self.key:
            return self.key
        base = self.name.rstrip("/").rsplit("/", 1)[-1] + (f"_{self.pretrained}" if self.pretrained and not
                                                            os.path.isfile(os.path.expanduser(self.pretrained))
                                                            else "")
        return re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")


class LabelsSpec(_Strict):
    classes: list[str] | None = None
    classes_file: str | None = None
    templates: Union[str, list[str]] = "openai"
    templates_file: str | None = None
    prompts_file: str | None = None
    top_k: int = Field(5, ge=1)
    min_score: float | None = Field(None, ge=0, le=1)
    unknown: str | None = None
    temperature: float = Field(1.0, gt=0)

    @field_validator("classes")
    @classmethod
    def _classes_non_empty(cls, v):
        if v is not None:
            if not v:
                raise ValueError("is empty; give at least one class")
            if any(not str(c).strip() for c in v):
                raise ValueError("contains an empty class name")
            if len(set(v)) != len(v):
                dup = sorted({c for c in v if v.count(c) > 1})
                raise ValueError(f"has duplicates: {dup}")
        return v

    @field_validator("templates")
    @classmethod
    def _templates_valid(cls, v):
        if isinstance(v, str):
            return v
        if not v:
            raise ValueError("is empty")
        for t in v:
            if "{}" not in t:
                raise ValueError(f"template {t!r} has no {{}} where the class name goes")
        return v

    @model_validator(mode="after")
    def _one_class_source(self):
        if (self.classes is None) == (self.classes_file is None):
            raise ValueError("give exactly one of labels.classes or labels.classes_file")
        if self.unknown is not None and self.min_score is None:
            raise ValueError("unknown names the label of images below labels.min_score; set min_score too")
        return self


class OutputSpec(_Strict):
    path: str
    storage_options: StorageOptions = Field(default_factory=dict)
    embeddings: bool = True
    embedding_dtype: Literal["float16", "float32"] = "float16"
    mode: Literal["resume", "overwrite", "error"] = "resume"
    rows_per_part: int = Field(4096, ge=1)


_COMPUTE_BOUNDS = {"batch_size": (lambda v: v >= 1, "must be >= 1"),
                   "gpus_per_actor": (lambda v: v >= 0, "must be >= 0"),
                   "cpus_per_actor": (lambda v: v > 0, "must be > 0")}


class ComputeSpec(_Strict):
    batch_size: Union[Literal["auto"], int] = "auto"
    actors: Union[Literal["auto"], int, tuple[int, int]] = "auto"
    gpus_per_actor: Union[Literal["auto"], float] = "auto"
    cpus_per_actor: Union[Literal["auto"], float] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    wait_for_gpus_s: float = Field(600, ge=0)  # on a running cluster without the GPUs asked for

    @field_validator(*_COMPUTE_BOUNDS)
    @classmethod
    def _in_range(cls, v, info):
        ok, message = _COMPUTE_BOUNDS[info.field_name]
        if v != "auto" and not ok(v):
            raise ValueError(message)
        return v

    @field_validator("actors")
    @classmethod
    def _actors_range(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1")
        if isinstance(v, tuple) and not 1 <= v[0] <= v[1]:
            raise ValueError("must be [min, max] with 1 <= min <= max")
        return v


class JobSpec(_Strict):
    name: str = "clipbatch-job"
    input: InputSpec
    model: ModelSpec | None = None
    models: list[MemberSpec] | None = None
    labels: LabelsSpec
    output: OutputSpec
    compute: ComputeSpec = Field(default_factory=ComputeSpec)

    @model_validator(mode="after")
    def _one_model_source(self):
        if (self.model is None) == (self.models is None):
            raise ValueError("give exactly one of model (one model) or models (an ensemble)")
        if self.models is not None:
            if len(self.models) < 2:
                raise ValueError("models: an ensemble lists at least two models (use model: for one)")
            keys = [m.column_key for m in self.models]
            if len(set(keys)) != len(keys):
                raise ValueError(f"models: two models would write the same column embedding_<key> ({keys}); "
                                 "give each a distinct key")
        return self

    @property
    def ensemble(self) -> bool:
        return self.models is not None

    @property
    def model_specs(self) -> list[MemberSpec]:
        """The job's models: the ensemble's, or the one model as a member of weight 1."""
        if self.models is not None:
            return list(self.models)
        return [MemberSpec(**self.model.model_dump())]


def format_error(err: ValidationError) -> str:
    """A pydantic error as one line that names the key."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    if first["type"] == "extra_forbidden":
        return f"unknown key '{where}' in job spec"
    if first["type"] == "missing":
        return f"missing required key '{where}' in job spec"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` with the value parsed as YAML (so 4 is an int, [1,2] a list)."""
    if "=" not in text:
        raise UserError(f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_spec(source: Union[str, os.PathLike, dict, JobSpec], overrides: dict[str, Any] | None = None) -> JobSpec:
    """Load a spec from a YAML path, a dict or a JobSpec, apply dotted overrides, validate."""
    if isinstance(source, JobSpec):
        raw = source.model_dump(mode="json", exclude_unset=True)
    elif isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"job spec {str(path)!r} not found")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: a job spec is a YAML mapping")
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy, plain types only
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_error(e)) from None


def parse_storage_options(items: list[str] | None) -> dict:
    """--storage-option key=value (repeatable) -> fsspec keyword arguments (values parsed as YAML),
    by the same rule as a spec's storage_options: credentials come from the environment only."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--storage-option {item!r}: expected key=value, e.g. endpoint_url=http://host:8333")
        options[key.strip()] = yaml.safe_load(value)
    try:
        return TypeAdapter(StorageOptions).validate_python(options)
    except ValidationError as exc:
        raise UserError(f"--storage-option: {format_error(exc)}") from None
