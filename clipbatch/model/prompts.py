"""What text goes into the zero-shot head: class names (with synonyms) x templates, or per-class prompts.

Everything a spec can say about prompts is resolved here into one shape,
``ClassPrompts``: the output label of each class and the sentences whose
normalized embeddings are averaged into that class's text embedding. The head
builder (text_head.py) then never needs to know where a sentence came from.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass

import fsspec
import yaml

from clipbatch.errors import UserError
from clipbatch.spec import LabelsSpec


@dataclass(frozen=True)
class ClassPrompts:
    names: list[str]            # output labels, in class order
    prompts: list[list[str]]    # per class: the sentences averaged into its text embedding
    templates: list[str]        # the templates used for classes without their own prompts
    templates_name: str         # a built-in set name, "file:<set>" or "custom", for reports
    custom: list[str]           # classes whose prompts are not just templates x name (synonyms, prompts_file)

    def digest(self) -> str:
        """Changes whenever any sentence changes: part of a job's fingerprint."""
        return hashlib.sha256(json.dumps([self.names, self.prompts]).encode()).hexdigest()[:16]


def _builtin_template_sets() -> dict[str, list[str]]:
    """open_clip's template sets, under CLIP_benchmark's names where they have one.

    open_clip 3.3 ships ImageNet's two sets only; any other ``<DATASET>_TEMPLATES`` a later
    open_clip adds to zero_shot_metadata appears here as ``<dataset>`` without a code change.
    Other datasets' sets (CLIP_benchmark's JSON, for one) load through ``labels.templates_file``.
    """
    from open_clip import zero_shot_metadata as meta

    def as_strings(templates) -> list[str]:
        return [t("{}") if callable(t) else str(t) for t in templates]

    sets = {"openai": as_strings(meta.OPENAI_IMAGENET_TEMPLATES),
            "simple": ["a photo of a {}."],
            "imagenet": as_strings(meta.OPENAI_IMAGENET_TEMPLATES),
            "simple-imagenet": as_strings(meta.SIMPLE_IMAGENET_TEMPLATES)}
    for attr in dir(meta):
        if attr.endswith("_TEMPLATES") and "IMAGENET" not in attr:
            sets.setdefault(attr.removesuffix("_TEMPLATES").lower().replace("_", "-"),
                            as_strings(getattr(meta, attr)))
    return sets


def template_set_names() -> list[str]:
    return list(_builtin_template_sets())


def _read(url: str, key: str, storage_options: dict | None):
    """A spec's side file (any fsspec URL): YAML/JSON parsed by extension, anything else as lines."""
    try:
        with fsspec.open(url, "r", encoding="utf-8", **(storage_options or {})) as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"labels.{key}: {url} not found") from None
    ext = posixpath.splitext(url.lower())[1]
    if ext in (".yaml", ".yml", ".json"):
        try:
            return json.loads(text) if ext == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise UserError(f"labels.{key}: {url} is not valid {ext[1:].upper()}: "
                            f"{str(e).splitlines()[0]}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _check_templates(templates, where: str) -> list[str]:
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise UserError(f"{where}: expected a non-empty list of template strings")
    for t in templates:
        if "{}" not in t:
            raise UserError(f"{where}: template {t!r} has no {{}} where the class name goes")
    return templates


def resolve_templates(labels: LabelsSpec | str | list[str],
                      storage_options: dict | None = None) -> tuple[list[str], str]:
    """(templates, a name for them): a built-in set, an inline list, or a templates_file.

    A templates_file holds one template per line (.txt), a YAML/JSON list, or a YAML/JSON mapping
    of set name -> list (CLIP_benchmark's en_zeroshot_classification_templates.json), from which
    ``labels.templates`` picks one set by name.
    """
    if not isinstance(labels, LabelsSpec):
        labels = LabelsSpec(classes=["x"], templates=labels)
    if labels.templates_file is None:
        if isinstance(labels.templates, str):
            sets = _builtin_template_sets()
            if labels.templates not in sets:
                raise UserError(f"labels.templates: unknown template set '{labels.templates}'; built-in sets: "
                                f"{', '.join(sets)} (or give a list of strings containing {{}}, "
                                "or a labels.templates_file)")
            return sets[labels.templates], labels.templates
        return list(labels.templates), "custom"
    content = _read(labels.templates_file, "templates_file", storage_options)
    where = f"labels.templates_file: {labels.templates_file}"
    if isinstance(content, dict):
        wanted = labels.templates if "templates" in labels.model_fields_set else None
        if not isinstance(wanted, str) and len(content) != 1:
            raise UserError(f"{where} holds sets {', '.join(map(str, content))}; name one with labels.templates")
        name = wanted if isinstance(wanted, str) else next(iter(content))
        if name not in content:
            raise UserError(f"{where} has no set '{name}' (it has {', '.join(map(str, content))})")
        return _check_templates(content[name], where), f"file:{name}"
    if "templates" in labels.model_fields_set:
        raise UserError("give labels.templates or a list in labels.templates_file, not both")
    return _check_templates(content, where), "file"


def _class_entries(labels: LabelsSpec, storage_options: dict | None) -> list[tuple[str, list[str]]]:
    """(label, names to prompt with) per class, from labels.classes or a classes_file.

    A classes_file is plain text (one class per line, # comments), or YAML/JSON: a list of names
    or of {name, synonyms}, or a mapping name -> synonyms.
    """
    if labels.classes is not None:
        return [(c, [c]) for c in labels.classes]
    url = labels.classes_file
    content = _read(url, "classes_file", storage_options)
    entries: list[tuple[str, list[str]]] = []
    items = content.items() if isinstance(content, dict) else content if isinstance(content, list) else None
    if items is None:
        raise UserError(f"labels.classes_file: {url} must hold a list of classes or a mapping class -> synonyms")
    for item in items:
        if isinstance(item, tuple):
            name, synonyms = item
        elif isinstance(item, dict) and set(item) <= {"name", "synonyms"} and "name" in item:
            name, synonyms = item["name"], item.get("synonyms")
        elif isinstance(item, (str, int, float)):
            name, synonyms = item, None
        else:
            raise UserError(f"labels.classes_file: {url}: cannot read class entry {item!r} "
                            "(expected a name or {name: ..., synonyms: [...]})")
        synonyms = [synonyms] if isinstance(synonyms, str) else list(synonyms or [])
        name = str(name).strip()
        if not name:
            raise UserError(f"labels.classes_file: {url} has an empty class name")
        entries.append((name, [name] + [str(s) for s in synonyms if str(s) != name]))
    if not entries:
        raise UserError(f"labels.classes_file: {url} holds no classes")
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"labels.classes_file: {url} has duplicate classes: {dup}")
    return entries


def _per_class_prompts(labels: LabelsSpec, storage_options: dict | None) -> dict[str, list[str]]:
    """CuPL-style prompts_file: a YAML/JSON mapping class -> complete sentences (no {})."""
    if labels.prompts_file is None:
        return {}
    content = _read(labels.prompts_file, "prompts_file", storage_options)
    where = f"labels.prompts_file: {labels.prompts_file}"
    if not isinstance(content, dict):
        raise UserError(f"{where} must be a YAML/JSON mapping class -> list of prompts")
    prompts = {}
    for name, sentences in content.items():
        sentences = [sentences] if isinstance(sentences, str) else sentences
        if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
            raise UserError(f"{where}: class {name!r} needs a non-empty list of prompt strings")
        prompts[str(name)] = sentences
    return prompts


def resolve_prompts(labels: LabelsSpec, storage_options: dict | None = None) -> ClassPrompts:
    """Every class's sentences: its own prompts_file prompts where it has some, else each of its
    names (the class and its synonyms) in every template."""
    templates, templates_name = resolve_templates(labels, storage_options)
    entries = _class_entries(labels, storage_options)
    own = _per_class_prompts(labels, storage_options)
    names = [n for n, _ in entries]
    if labels.prompts_file is not None and not set(own) & set(names):
        raise UserError(f"labels.prompts_file: {labels.prompts_file} has prompts for none of the classes")
    if labels.unknown is not None and labels.unknown in names:
        raise UserError(f"labels.unknown: '{labels.unknown}' is also a class name")
    prompts = [own.get(name) or [t.replace("{}", s) for s in synonyms for t in templates]
               for name, synonyms in entries]
    custom = [name for name, synonyms in entries if name in own or len(synonyms) > 1]
    return ClassPrompts(names, prompts, templates, templates_name, custom)
