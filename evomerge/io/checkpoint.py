"""Everything in an output checkpoint besides the weights: config, tokenizer, card, recipe.

The output is a plain Hugging Face directory that `AutoModelForCausalLM.from_pretrained`
loads, plus `mergekit_config.yml` so the same merge can be reproduced with mergekit.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

from evomerge import __version__
from evomerge.io.lora import AdapterRef, ModelSource, folders_of, model_folder, split_reference

# Files that carry the tokenizer and generation defaults (copied from the donor as is).
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def write_config(
    donor_dir: Path,
    out_dir: Path,
    *,
    dtype_name: str,
    num_hidden_layers: int,
    vocab_size: int | None = None,
    layer_origins: Sequence[int] = (),
) -> dict:
    """Copy the donor's config.json with the output dtype, layer count and (for a merge with an
    output vocabulary) vocabulary size.

    `layer_origins[i]` is the donor layer output layer i was taken from (a frankenmerge's
    slices); every per-layer list of the config (`layer_types` and the like: a list with one
    entry per donor layer) is re-indexed the same way, so the output loads. Empty: layer i is
    layer i.
    """
    config = json.loads((Path(donor_dir) / "config.json").read_text())
    if vocab_size is not None:
        holder = config if "vocab_size" in config or "text_config" not in config else config["text_config"]
        holder["vocab_size"] = vocab_size
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    origins = list(layer_origins) or list(range(num_hidden_layers))
    if len(origins) != num_hidden_layers:
        raise ValueError(f"{len(origins)} layer origins for {num_hidden_layers} layers")
    for section in (config, config.get("text_config")):
        if isinstance(section, dict):
            _reindex_layers(section, origins)
    if not any(key in config for key in _LAYER_COUNT_KEYS):
        config["num_hidden_layers"] = num_hidden_layers
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _reindex_layers(section: dict, origins: list[int]) -> None:
    """Set one config section's layer count to len(origins) and pick its per-layer lists' entries."""
    key = next((k for k in _LAYER_COUNT_KEYS if isinstance(section.get(k), int)), None)
    if key is None:
        return
    declared = section[key]
    section[key] = len(origins)
    if max(origins, default=-1) >= declared:
        raise ValueError(f"layer origin {max(origins)} is outside the donor's {declared} layers")
    for name, value in section.items():
        if isinstance(value, list) and len(value) == declared > 1 and not _NOT_PER_LAYER.search(name):
            section[name] = [value[origin] for origin in origins]


# Lists that are never one entry per layer, whatever their length.
_NOT_PER_LAYER = re.compile(r"^architectures$|token_ids?$")


def copy_tokenizer(donor_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(donor_dir) / name
        if source.is_file():
            shutil.copyfile(source, Path(out_dir) / name)
            copied.append(name)
    return copied


def write_recipe(out_dir: Path, recipe_yaml: str) -> Path:
    path = Path(out_dir) / "mergekit_config.yml"
    path.write_text(recipe_yaml)
    return path


# A Hugging Face hub cache folder: .../models--ORG--NAME/snapshots/REVISION
_HUB_CACHE_PART = re.compile(r"models--(?:(?P<org>[^/]+?)--)?(?P<name>[^/]+)")


def hub_id(path: Path) -> str | None:
    """The Hub id of a local checkpoint when it is a Hub cache snapshot; None for other folders."""
    for part in Path(path).parts:
        match = _HUB_CACHE_PART.fullmatch(part)
        if match:
            return f"{match['org']}/{match['name']}" if match["org"] else match["name"]
    return None


def hub_ids(paths: Iterable[ModelSource]) -> list[str]:
    return list(dict.fromkeys(i for i in (hub_id(model_folder(p)) for p in paths) if i))


def _relative(path: Path, final_dir: Path) -> str:
    return os.path.relpath(os.path.realpath(path), os.path.realpath(final_dir))


def _relative_source(source: ModelSource, final_dir: Path) -> str:
    """A model folder relative to `final_dir`; `base+adapter` with both parts relative."""
    return "+".join(_relative(folder, final_dir) for folder in folders_of(source))


def _as_source(reference: str) -> ModelSource:
    parts = split_reference(reference)
    return AdapterRef(Path(parts[0]), Path(parts[1])) if parts else Path(reference)


def describe_sources(models: Mapping[str, ModelSource], *, final_dir: Path, names: Mapping[str, str]) -> list[str]:
    """One line per source for the card: a Hub id, a local path (relative to the model folder)
    or an intermediate merge of the recipe."""
    lines = []
    for ref, path in models.items():
        if ref in names:
            lines.append(f"`{ref}`: {names[ref]}")
            continue
        found = hub_id(model_folder(path))
        label = (
            "+".join(f.name for f in folders_of(path)) if ("/" in ref or os.sep in ref) else ref
        )  # a path: its folder
        kind = "base and LoRA adapter folders" if isinstance(path, AdapterRef) else "local folder"
        where = f"{kind} `{_relative_source(path, final_dir)}` (relative to this folder)"
        lines.append(
            f"`{label}`: " + (f"Hub model [{found}](https://huggingface.co/{found}), {where}" if found else where)
        )
    return lines


def _model_fields(document: dict) -> list[tuple[dict, str]]:
    """(holder, key) of every model reference in one mergekit document."""
    fields = []
    for entry in document.get("models") or ():
        if isinstance(entry, dict) and isinstance(entry.get("model"), str):
            fields.append((entry, "model"))
    for out_slice in document.get("slices") or ():
        if not isinstance(out_slice, dict):
            continue
        for source in out_slice.get("sources") or ():
            if isinstance(source, dict) and isinstance(source.get("model"), str):
                fields.append((source, "model"))
        if isinstance(out_slice.get("base_model"), str):
            fields.append((out_slice, "base_model"))
    if isinstance(document.get("base_model"), str):
        fields.append((document, "base_model"))
    if document.get("tokenizer_source") not in (None, "base", "union") and isinstance(
        document["tokenizer_source"], str
    ):
        fields.append((document, "tokenizer_source"))
    section = document.get("tokenizer")
    if isinstance(section, dict):
        if section.get("source") not in (None, "base", "union") and isinstance(section["source"], str):
            fields.append((section, "source"))
        for entry in (section.get("tokens") or {}).values() if isinstance(section.get("tokens"), dict) else ():
            source = entry.get("source") if isinstance(entry, dict) else None
            if isinstance(source, str):
                fields.append((entry, "source"))
            elif isinstance(source, dict) and isinstance(source.get("model"), str):
                fields.append((source, "model"))
    return fields


def _relocate_data(data: object, paths: Mapping[str, ModelSource], keep: set[str], final_dir: Path) -> None:
    """A `data:` section (data merge methods) follows its models: the per-model task mapping's
    keys as model references, absolute include paths and cache folder relative to `final_dir`."""
    if not isinstance(data, dict):
        return
    tasks = data.get("tasks")
    if isinstance(tasks, dict):
        relocated = {}
        for ref, names in tasks.items():
            if ref in paths and ref not in keep:
                ref = _relative_source(paths[ref], final_dir)
            elif isinstance(ref, str) and os.path.isabs(ref) and ref not in keep:
                ref = _relative_source(_as_source(ref), final_dir)
            relocated[ref] = names
        data["tasks"] = relocated
    if isinstance(data.get("include_paths"), list):
        data["include_paths"] = [
            _relative(Path(p), final_dir) if isinstance(p, str) and os.path.isabs(p) else p
            for p in data["include_paths"]
        ]
    if isinstance(data.get("cache_dir"), str) and os.path.isabs(data["cache_dir"]):
        data["cache_dir"] = _relative(Path(data["cache_dir"]), final_dir)


def relocate_recipe(
    recipe_yaml: str, *, final_dir: Path, paths: Mapping[str, ModelSource], names: Iterable[str] = ()
) -> str:
    """The recipe with every model path relative to `final_dir` (the folder it is written into).

    evomerge resolves relative paths from the recipe's folder, so `evomerge merge` runs the copy
    in the model folder as is (mergekit resolves them from the working directory: run it there).
    Intermediate-merge names stay names; leading comment lines are kept."""
    if not recipe_yaml.strip():
        return recipe_yaml
    from evomerge.config.mergekit_yaml import dump_yaml

    lines = recipe_yaml.splitlines(keepends=True)
    header = "".join(
        line for line in lines[: next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))]
    )
    documents = [doc for doc in yaml.safe_load_all(recipe_yaml) if doc is not None]
    keep = set(names)
    for document in documents:
        if not isinstance(document, dict):
            return recipe_yaml
        for holder, key in _model_fields(document):
            ref = holder[key]
            if ref in keep:
                continue
            if ref in paths:
                holder[key] = _relative_source(paths[ref], final_dir)
            elif os.path.isabs(ref):  # `base+adapter`: both parts relocated
                holder[key] = _relative_source(_as_source(ref), final_dir)
        _relocate_data(document.get("data"), paths, keep, final_dir)
    note = "# Model paths are relative to this file's folder.\n"
    return header + note + "---\n".join(dump_yaml(document) for document in documents)


def _number(value: float | None) -> str:
    return "-" if value is None else ("nan" if math.isnan(value) else f"{value:.4f}")


def write_model_card(
    out_dir: Path,
    *,
    methods: Sequence[str],
    sources: Sequence[str],
    base_model: str | None,
    recipe_yaml: str,
    seed: int | None,
    base_model_ids: Sequence[str] = (),
    multi_document: bool = False,
    score_columns: Sequence[str] = (),
    score_rows: Sequence[tuple[str, str, Sequence[float | None]]] = (),
    search: Mapping[str, str] | None = None,
    provenance: Mapping[str, str] | None = None,
) -> Path:
    """A README.md model card: what was merged, how, how it scored and how to reproduce it.

    `base_model` metadata lists only Hub ids (`base_model_ids`); local folders are named as such
    in the text. `score_rows` are (task, metric, one value per `score_columns`)."""
    front = ["---"]
    if base_model_ids:
        front += ["base_model:"] + [f"- {model_id}" for model_id in base_model_ids]
    front += [
        "base_model_relation: merge",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- evomerge",
        "- mergekit",
        "---",
        "",
    ]
    lines = [
        "# Merged model",
        "",
        f"Made with [evomerge](https://pypi.org/project/evomerge/) {__version__} "
        f"using the {', '.join(f'`{m}`' for m in methods)} merge method{'s' if len(methods) > 1 else ''}.",
        "",
    ]
    if base_model:
        lines += [f"Base model: `{base_model}`.", ""]
    lines += ["## Source models", ""] + [f"- {line}" for line in sources] + [""]
    if score_rows:
        lines += [
            "## Scores",
            "",
            "| task | metric | " + " | ".join(score_columns) + " |",
            "|---|---|" + "---:|" * len(score_columns),
        ]
        lines += [
            f"| {task} | {metric} | " + " | ".join(_number(v) for v in values) + " |"
            for task, metric, values in score_rows
        ]
        if any(v is None for _, _, values in score_rows for v in values):
            lines += ["", "`-`: not scored (held-out tasks are scored for the search's finalists only)."]
        lines.append("")
    if search:
        lines += ["## Search", ""] + [f"- {key}: {value}" for key, value in search.items()] + [""]
    masks = f" DARE/DELLA masks use seed {seed} in evomerge; mergekit draws its own." if seed is not None else ""
    ours = "evomerge merge mergekit_config.yml ../reproduced" + (f" --seed {seed}" if seed else "")
    if multi_document:
        reproduce = (
            f"A multi-document recipe (intermediate merges, then the final one). From this folder: `{ours}`, or "
            "`mergekit-multi mergekit_config.yml --intermediate-dir ../reproduced-parts --out-path ../reproduced`."
        )
    else:
        reproduce = f"From this folder: `{ours}`, or `mergekit-yaml mergekit_config.yml ../reproduced`."
    lines += ["## Recipe", "", reproduce + masks, "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    if provenance:
        lines += ["## Provenance", ""] + [f"- {key}: {value}" for key, value in provenance.items()] + [""]
    path = Path(out_dir) / "README.md"
    path.write_text("\n".join(front + lines))
    return path
