"""Statistics for a merge plan: which models need which statistic, checked before merging, then computed or reused."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from evomerge.config.mergekit_yaml import DataSection, MergeConfig
from evomerge.data_stats.cache import StatisticsRequest, StatisticsResult, ensure_statistics
from evomerge.errors import ConfigError
from evomerge.io.lora import AdapterRef, ModelSource, model_folder
from evomerge.merge.plan import MergePlan
from evomerge.merge.registry import get_method

STATS_FOLDER = ".evomerge-stats"  # the default cache, beside the output folder


def data_statistic(document: MergeConfig) -> str | None:
    """The statistic the document's method needs (None: not a data method)."""
    try:
        return get_method(document.merge_method).statistic
    except ValueError:
        return None  # the planner reports an unknown method


def check_data(documents: Sequence[MergeConfig], config_path: Path) -> list[str]:
    """Before any merging: every data method has a data: section naming known tasks for its
    models, tasks that give examples (checks.check_data_tasks); returns a line per such document."""
    from evomerge.data_stats.checks import check_data_tasks, data_task_fields

    lines = []
    for index, document in enumerate(documents):
        if data_statistic(document) is None:
            continue
        where = "data" if len(documents) == 1 else f"document {index + 1}: data"
        if document.data is None:
            raise ConfigError(
                f"{document.merge_method} needs data: add a 'data:' section with the lm-eval tasks to compute "
                "statistics on (tasks:, optionally include_paths:, examples:)",
                file=config_path,
                field=where,
            )
        names = [ref for ref in document.referenced_models() if ref != document.base_model]
        missing = [ref for ref in names if document.data.tasks_for(ref) is None]
        if missing:
            raise ConfigError(f"no tasks for model '{missing[0]}'", file=config_path, field=f"{where}.tasks")
        include = include_paths(document.data, config_path)
        for path in include:
            if not path.is_dir():
                raise ConfigError(
                    f"{path} is not a folder of lm-eval task YAMLs", file=config_path, field=f"{where}.include_paths"
                )
        checked = check_data_tasks(
            data_task_fields(document.data, names, where),
            include,
            method=document.merge_method,
            examples=document.data.examples,
            file=config_path,
        )
        lines.append(f"{where}: {checked}")
    return lines


def with_absolute_data(document: MergeConfig, config_path: Path) -> MergeConfig:
    """`document` with its data section's include paths and cache folder absolute (resolved from
    the config's folder), so the recipe written beside the output can point at them from there."""
    data = document.data
    if data is None:
        return document
    folder = Path(config_path).parent
    absolute = data.model_copy(
        update={
            "include_paths": [str((folder / p).resolve()) for p in data.include_paths],
            "cache_dir": None if data.cache_dir is None else str((folder / data.cache_dir).resolve()),
        }
    )
    return document.model_copy(update={"data": absolute})


def include_paths(data: DataSection, config_path: Path) -> tuple[Path, ...]:
    return tuple((Path(config_path).parent / p).resolve() for p in data.include_paths)


def cache_folder(data: DataSection, config_path: Path, out_dir: Path) -> Path:
    """data.cache_dir (relative to the config's folder), else `.evomerge-stats` beside the output."""
    if data.cache_dir is not None:
        return (Path(config_path).parent / data.cache_dir).resolve()
    return Path(out_dir).resolve().parent / STATS_FOLDER


def statistics_folder(source: ModelSource, name: str, *, file: object, field: str) -> Path:
    """The checkpoint folder a model's statistics are taken from. An adapter's folder holds only
    its factors and its base is another model, so a data method refuses it rather than measure
    the base in its place."""
    if isinstance(source, AdapterRef):
        raise ConfigError(
            f"model '{name}' is a LoRA adapter ({source}): fisher and regmean measure a full fine-tune; "
            "fold the adapter into its base first (PEFT merge_and_unload) or use another method",
            file=file,
            field=field,
        )
    return model_folder(source)


def attach_statistics(
    plan: MergePlan, document: MergeConfig, *, config_path: Path, out_dir: Path, device: str = "cpu"
) -> tuple[MergePlan, list[StatisticsResult]]:
    """`plan` with the statistics files of every model a data-method tensor reads (computed on a miss)."""
    kind = data_statistic(document)
    if kind is None:
        return plan, []
    data = document.data
    assert data is not None  # check_data ran first
    refs = {
        ref
        for recipe in plan.tensors
        if get_method(recipe.method).statistic
        for index, (ref, _) in enumerate(recipe.inputs)
        if index != recipe.base_index
    }
    # Every model checked before any statistic is computed.
    folders = {ref: statistics_folder(plan.models[ref], ref, file=config_path, field="merge_method") for ref in refs}
    cache = cache_folder(data, config_path, out_dir)
    files, results = {}, []
    for ref in sorted(refs):
        tasks = data.tasks_for(ref)
        if tasks is None:
            raise ConfigError(f"no tasks for model '{ref}'", file=config_path, field="data.tasks")
        request = StatisticsRequest(
            kind=kind,
            model_dir=folders[ref],
            tasks=tuple(tasks),
            include_paths=include_paths(data, config_path),
            examples=data.examples,
            seed=data.seed,
        )
        try:
            result = ensure_statistics(request, cache, device=device)
        except ValueError as exc:  # tasks without usable examples (e.g. generation only)
            raise ConfigError(f"model '{ref}': {exc}", file=config_path, field="data.tasks") from None
        files[ref] = result.path
        results.append(result)
    return replace(plan, statistics=files), results
