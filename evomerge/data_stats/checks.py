"""Before any model loads: the data methods' tasks exist and can give examples.

One check for `evomerge merge` and `validate` of a merge YAML (for_plan.check_data) and for a
search's preflight (for_space.check_space_data). Without it an unknown task, a generation-only
task or one whose documents have no gold answer surfaces only when the statistics are computed:
in a search, when every worker starts, after the references and the model loading.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from evomerge.config.mergekit_yaml import DataSection
from evomerge.errors import ConfigError, first_line

# The output types whose documents have a loglikelihood request to score (examples.gold_instances).
USABLE_OUTPUT_TYPES = ("loglikelihood", "multiple_choice")


def data_task_fields(data: DataSection, models: Iterable[str], where: str) -> dict[str, str]:
    """Each task the `models` use -> the field that names it first (`data.tasks.0`,
    `data.tasks.reverse.0`), for errors that point at the entry to fix."""
    if isinstance(data.tasks, list):
        named = [(f"{where}.tasks.{i}", task) for i, task in enumerate(data.tasks)]
    else:
        named = [
            (f"{where}.tasks.{model}.{i}", task) for model in models for i, task in enumerate(data.tasks.get(model, ()))
        ]
    fields: dict[str, str] = {}
    for field, task in named:
        fields.setdefault(task, field)
    return fields


def check_data_tasks(
    fields: Mapping[str, str],
    include_paths: Sequence[Path],
    *,
    method: str,
    examples: int,
    file: object,
    hint: str = "",
) -> str:
    """Every task of `fields` (task -> its field) loads, and its first `examples` documents give
    at least one gold-answer example; returns the check's line. `hint` ends every message."""
    from evomerge.data_stats.examples import gold_instances
    from evomerge.evaluate.harness import _quiet_lm_eval, load_task_dict

    for name, field in fields.items():
        try:
            task_dict = load_task_dict([name], include_paths)
        except ValueError as exc:  # unknown (with a did-you-mean), or a broken YAML or dataset
            raise ConfigError(f"{exc}{hint}", file=file, field=field) from None
        tasks = list(task_dict["tasks"].values())  # a group: its leaves
        usable = [task for task in tasks if task.OUTPUT_TYPE in USABLE_OUTPUT_TYPES]
        if not usable:
            kinds = ", ".join(sorted({str(task.OUTPUT_TYPE) for task in tasks})) or "no task"
            raise ConfigError(
                f"task '{name}' is {kinds}: {method} takes its examples from loglikelihood or multiple_choice "
                f"tasks (a gold answer to score){hint}",
                file=file,
                field=field,
            )
        try:
            with _quiet_lm_eval(False):
                found = any(gold_instances(task, limit=examples) for task in usable)
        except Exception as exc:  # noqa: BLE001 - a task's templates can raise anything on its documents
            first = first_line(exc, 300)
            raise ConfigError(
                f"lm-eval cannot build the requests of task '{name}' ({type(exc).__name__}: {first}){hint}",
                file=file,
                field=field,
            ) from None
        if not found:
            raise ConfigError(
                f"none of the first {examples} documents of task '{name}' has its gold answer among its choices: "
                f"{method} would have no example to take{hint}",
                file=file,
                field=field,
            )
    return f"{len(fields)} task(s) load and give {method} gold-answer examples"
