"""Statistics for a search: the data method's statistic of every fine-tune, computed or read from
the cache once per worker (and once per export), then resident with the sources for every trial.

The cache is the `data:` section's `cache_dir`, else `.evomerge-stats` in the space file's folder.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.config.space import SearchSpace
from evomerge.data_stats.cache import StatisticsRequest, ensure_statistics
from evomerge.data_stats.for_plan import STATS_FOLDER, statistics_folder
from evomerge.errors import ConfigError
from evomerge.merge.registry import get_method


def space_cache_folder(space: SearchSpace) -> Path:
    data = space.data_section()
    if data is not None and data.cache_dir is not None:
        return Path(data.cache_dir)
    folder = space.source_path.parent if space.source_path else Path.cwd()
    return folder.resolve() / STATS_FOLDER


def check_space_data(space: SearchSpace, models: dict) -> str | None:
    """For validate and run, before any model loads: no adapter among the fine-tunes and tasks that
    give examples, which space_statistics would otherwise find at every worker's start; `models`
    maps names to their sources (genome.paths). None when the genome has no data method."""
    from evomerge.data_stats.checks import check_data_tasks, data_task_fields

    methods = space.data_methods()
    data = space.data_section()
    if not methods or data is None:
        return None
    for model in space.models:
        statistics_folder(models[model.name], model.name, file=space.source_path, field="genome.methods")
    if space.data is not None:
        fields = data_task_fields(data, [model.name for model in space.models], "data")
        hint = ""
    else:  # every fine-tune takes the objectives' search tasks
        fields = {}
        for index, objective in enumerate(space.objectives):
            fields.setdefault(objective.task, f"objectives.{index}.task")
        hint = f" (no data: section, so {methods[0]} uses the objectives' tasks; add one to choose others)"
    include = tuple(Path(p) for p in data.include_paths)
    checked = check_data_tasks(
        fields, include, method=methods[0], examples=data.examples, file=space.source_path, hint=hint
    )
    cache = space_cache_folder(space)
    check_cache_folder(cache, file=space.source_path)
    return f"data: {checked} for {len(space.models)} fine-tunes; statistics cached in {cache}"


def check_cache_folder(cache: Path, *, file: object) -> None:
    """The statistics folder is one, or can be made (an existing one may be a read-only shared cache)."""
    from evomerge.cli_checks import output_dir
    from evomerge.errors import EvomergeError

    if cache.is_dir():
        return
    try:
        output_dir(cache)
    except EvomergeError as exc:
        raise ConfigError(f"the statistics cache: {exc}", file=file, field="data.cache_dir") from None


def space_statistics(space: SearchSpace, models: dict, *, device: str = "cpu") -> dict[str, Path]:
    """Fine-tune name -> its statistics file (empty when the genome has no data method);
    `models` maps names to their sources (genome.paths)."""
    methods = space.data_methods()
    data = space.data_section()
    if not methods or data is None:
        return {}
    kind = get_method(methods[0]).statistic
    cache = space_cache_folder(space)
    folders = {
        model.name: statistics_folder(models[model.name], model.name, file=space.source_path, field="genome.methods")
        for model in space.models
    }  # every model checked before any statistic is computed
    files = {}
    for model in space.models:
        tasks = data.tasks_for(model.name)
        if not tasks:
            raise ConfigError(f"no tasks for model '{model.name}'", file=space.source_path, field="data.tasks")
        request = StatisticsRequest(
            kind=kind,
            model_dir=folders[model.name],
            tasks=tuple(tasks),
            include_paths=tuple(Path(p) for p in data.include_paths),
            examples=data.examples,
            seed=data.seed,
        )
        try:
            files[model.name] = ensure_statistics(request, cache, device=device).path
        except ValueError as exc:  # unknown tasks, or tasks without usable examples (generation only)
            field = "data.tasks" if space.data is not None else "objectives"
            raise ConfigError(
                f"{methods[0]}, model '{model.name}': {exc}", file=space.source_path, field=field
            ) from None
    return files


def data_yaml(space: SearchSpace) -> dict | None:
    """The `data:` section a trial's mergekit YAML carries so `evomerge merge` reproduces it
    (absolute paths; the search's cache folder, so the merge reads the same files)."""
    data = space.data_section()
    if data is None:
        return None
    section = data.model_dump(mode="json")
    section["cache_dir"] = str(space_cache_folder(space))
    return section
