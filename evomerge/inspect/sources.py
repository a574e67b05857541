"""The base and the fine-tunes to inspect, from a space file or a mergekit merge YAML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evomerge.config.mergekit_yaml import load_merge_documents, load_yaml_documents
from evomerge.config.space import is_space_file, load_space
from evomerge.errors import ConfigError
from evomerge.merge.planner import resolve_model_path


@dataclass(frozen=True)
class Family:
    base: tuple[str, Path]  # (name, directory)
    models: tuple[tuple[str, Path], ...]
    group_size: int | None  # the space genome's layers per group, when it sets one
    allow_pickle: bool = False


def family_from_file(path: Path) -> Family:
    """A space file's `models` and `base_model`, or a merge YAML's models and `base_model` (the
    last document of a mergekit-multi file, whose models must be folders, not earlier parts)."""
    path = Path(path)
    documents = load_yaml_documents(path)
    if len(documents) == 1 and is_space_file(documents[0]):
        space = load_space(path, check_paths=False)  # the models only: tasks and storage are not needed here
        if space.base_model is None:
            raise ConfigError(
                "inspect compares each model with the base: set base_model", file=path, field="base_model"
            )
        for field, model in [
            *((f"models.{i}", m) for i, m in enumerate(space.models)),
            ("base_model", space.base_model),
        ]:
            if not model.path.is_dir():
                raise ConfigError(f"model directory {model.path} does not exist", file=path, field=field)
        granularity = getattr(space.genome, "layer_granularity", 0) or None
        return Family(
            base=(space.base_model.name, space.base_model.path),
            models=tuple((m.name, m.path) for m in space.models),
            group_size=granularity,
            allow_pickle=space.allow_pickle,
        )
    configs = load_merge_documents(path)
    config = configs[-1]
    where = f"document {len(configs)}: " if len(configs) > 1 else ""
    parts = {c.name for c in configs[:-1]}
    if not config.base_model:
        raise ConfigError(
            f"{where}inspect compares each model with the base: set base_model", file=path, field="base_model"
        )

    def resolve(reference: str, field: str) -> Path:
        if reference in parts:
            raise ConfigError(
                f"{where}'{reference}' is an earlier document's output, which exists only once merged: "
                "inspect that document's sources instead",
                file=path,
                field=field,
            )
        try:
            return resolve_model_path(reference, path.parent)
        except FileNotFoundError as exc:
            raise ConfigError(f"{where}{exc}", file=path, field=field) from None

    references = [r for r in config.referenced_models() if r != config.base_model]
    if not references:
        raise ConfigError(f"{where}no model besides the base to inspect", file=path, field="models")
    labels = _short_names([*references, config.base_model])
    return Family(
        base=(labels[-1], resolve(config.base_model, "base_model")),
        models=tuple((label, resolve(r, "models")) for label, r in zip(labels, references)),
        group_size=None,
    )


def _short_names(references: list[str]) -> list[str]:
    """Each model's folder name for the tables, or the reference as written when two folders share a name."""
    names = [Path(r).name or r for r in references]
    return names if len(set(names)) == len(names) else list(references)
