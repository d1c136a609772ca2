"""``Member``: one model of a job, the same object from the spec to the encoders to the output's metadata.

A one-model job has one member of weight 1 whose embedding goes to ``embedding``;
an ensemble's members write ``embedding_<key>`` each and their probabilities are
mixed with their weights. The output's metadata is always the list of its members
(``models: [...]``); outputs written before that shape are read here too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clipbatch.errors import UserError, one_line
from clipbatch.model.load import (LoadedModel, check_hub_model, check_model_name, comparable_preprocess,
                                  load_model, preprocess_config)
from clipbatch.spec import JobSpec

# Metadata keys of a member, as the output's metadata and manifest write them.
_FIELDS = {"model": "name", "pretrained": "pretrained", "precision": "precision", "weight": "weight",
           "embedding_column": "column", "preprocess_cfg": "preprocess", "logit_scale": "logit_scale",
           "logit_bias": "logit_bias", "embedding_dim": "embedding_dim"}


@dataclass(frozen=True)
class Member:
    name: str                      # as the spec names it (clipbatch-demo, ViT-B-32, local-dir:..., hf-hub:...)
    pretrained: str | None = None
    precision: str = "auto"        # the spec's; the precision it ran at once its text head is built
    weight: float = 1.0            # relative; the scores mix normalizes over the members
    column: str = "embedding"      # its embedding column
    preprocess: dict | None = None  # its image preprocessing (comparable_preprocess)
    logit_scale: float | None = None  # known once the model is loaded
    logit_bias: float | None = None   # SigLIP-style models only
    embedding_dim: int | None = None

    @property
    def label(self) -> str:
        return self.name + (f" ({self.pretrained})" if self.pretrained else "")

    def load(self, device: str = "auto", precision: str | None = None) -> LoadedModel:
        """The model through open_clip's loader; one line naming it where it cannot be loaded."""
        try:
            loaded = load_model(self.name, self.pretrained, device=device, precision=precision or self.precision)
        except UserError:
            raise
        except Exception as exc:  # files the checks found but cannot read (corrupt, truncated, another model's)
            raise UserError(f"model {self.label} cannot be loaded: {one_line(exc)}") from None
        if self.preprocess and comparable_preprocess(loaded.preprocess_cfg) != self.preprocess:
            raise UserError(f"model {self.label} expects {comparable_preprocess(loaded.preprocess_cfg)} but its "
                            f"images were prepared for {self.preprocess}; please report this with the model name")
        return loaded

    def ran_with(self, loaded: LoadedModel, embedding_dim: int) -> "Member":
        """This member with what its loaded model says: precision, logit scale and bias, embedding size."""
        return dataclasses.replace(self, precision=loaded.precision, logit_scale=loaded.logit_scale,
                                   logit_bias=loaded.logit_bias, embedding_dim=embedding_dim)

    def metadata(self) -> dict:
        return {key: getattr(self, attr) for key, attr in _FIELDS.items()}


def members_of(spec: JobSpec) -> list[Member]:
    """The spec's models, checked (names, tags, hub configs) and with their preprocessing, before any work."""
    members = []
    for i, m in enumerate(spec.model_specs):
        try:
            check_model_name(m.name, m.pretrained)
            check_hub_model(m.name)
        except UserError as exc:
            raise UserError(f"{f'models[{i}]' if spec.ensemble else 'model'}: {exc}") from None
        column = f"embedding_{m.column_key}" if spec.ensemble else "embedding"
        members.append(Member(m.name, m.pretrained, m.precision, m.weight, column,
                              preprocess_config(m.name, m.pretrained)))
    return members


def members_from_metadata(metadata: dict) -> list[Member]:
    """The members an output's metadata or manifest records, in any shape clipbatch has written."""
    if "models" in metadata:
        rows = metadata["models"]
    elif "ensemble" in metadata:  # ensembles written before the list of models
        rows = metadata["ensemble"]
    else:  # one model, written before the list of models: its keys at the top level
        rows = [{key: metadata.get(key) for key in _FIELDS if key in metadata}]
    return [Member(**{attr: row[key] for key, attr in _FIELDS.items() if key in row}) for row in rows]


def current_metadata(metadata: dict) -> dict:
    """Metadata or a manifest in today's shape: its models as the list ``models``, whatever shape it had."""
    if "models" in metadata or not {"model", "ensemble"} & set(metadata):
        return metadata
    members = members_from_metadata(metadata)
    kept = {k: v for k, v in metadata.items() if k not in _FIELDS and k != "ensemble"}
    return {**kept, "models": [m.metadata() for m in members]}
