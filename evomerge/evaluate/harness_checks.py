"""Before a search, for the lm_eval evaluator: the objectives' tasks load, report their metrics, and fit.

Run by `evomerge validate` and `run_search` through the evaluator table (EvaluatorKind.check),
so a typo in a task or metric name is one line naming the field, not a search whose every trial fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.suggest import did_you_mean

if TYPE_CHECKING:
    from evomerge.config.space import SearchSpace


def check_tasks(space: SearchSpace, tokenizer_dir: Path | None) -> str:
    """The objectives' tasks load, report the configured metrics, and fit `eval.max_length`."""
    from evomerge.evaluate.harness import load_task_dict, reported_metrics

    wanted: list[tuple[str, str, str]] = []  # (field, task, metric)
    for index, objective in enumerate(space.objectives):
        wanted.append((f"objectives.{index}.task", objective.task, objective.metric))
        if objective.selection_task:
            wanted.append((f"objectives.{index}.selection_task", objective.selection_task, objective.metric))
    search_tasks = [o.task for o in space.objectives]
    try:
        search_dict = load_task_dict(search_tasks, space.eval.include_paths)
    except ValueError as exc:  # an unknown task (named in the message), or e.g. a task also inside a group
        raise ConfigError(
            str(exc), file=space.source_path, field=_field_named(wanted, str(exc), "objectives")
        ) from None
    selection_tasks = [o.selection_task for o in space.objectives if o.selection_task]
    try:
        selection_dict = load_task_dict(selection_tasks, space.eval.include_paths) if selection_tasks else None
    except ValueError as exc:
        raise ConfigError(
            str(exc), file=space.source_path, field=_field_named(wanted, str(exc), "objectives")
        ) from None
    for field_name, task, metric in wanted:
        task_dict = selection_dict if field_name.endswith("selection_task") else search_dict
        metrics = reported_metrics(task_dict, task)
        if metric not in metrics:
            hint = did_you_mean(metric, metrics, same_as=lambda reported: reported.split(",", 1)[0])
            index = field_name.split(".")[1]
            raise ConfigError(
                f"task '{task}' reports no metric '{metric}' (it reports: {', '.join(sorted(metrics)) or 'none'}){hint}",
                file=space.source_path,
                field=f"objectives.{index}.metric",
            )
    line = f"tasks: {len(set(search_tasks + selection_tasks))} load, every objective's metric is reported"
    if space.eval.max_length is not None and tokenizer_dir is not None:
        line += "; " + _check_max_length(space, tokenizer_dir, search_dict, selection_dict)
    fidelity = space.eval.fidelity
    if fidelity is not None and fidelity.order == "margin":
        unordered = [t for t in search_tasks if _output_type(search_dict, t) != "multiple_choice"]
        if unordered:
            line += (
                f"; eval.fidelity.order margin: {', '.join(dict.fromkeys(unordered))} not multiple choice "
                "(no answer margins: those items keep the random order)"
            )
    return line


def _output_type(task_dict: Any, name: str) -> str | None:
    task = task_dict["tasks"].get(name)
    return getattr(task, "OUTPUT_TYPE", None) if task is not None else None


def _field_named(wanted: list[tuple[str, str, str]], message: str, default: str) -> str:
    """The objective field whose task an lm-eval message names (first match), else `default`."""
    return next((field_name for field_name, task, _ in wanted if f"task '{task}'" in message), default)


def _check_max_length(space: SearchSpace, tokenizer_dir: Path, *task_dicts: Any) -> str:
    from transformers import AutoTokenizer

    from evomerge.evaluate.harness import longest_continuation

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    longest, task = 0, ""
    for task_dict, limit in zip(task_dicts, (space.eval.limit, space.eval.selection_limit or space.eval.limit)):
        if task_dict is not None:
            tokens, where = longest_continuation(task_dict, tokenizer, limit=limit)
            if tokens > longest:
                longest, task = tokens, where
    if longest > space.eval.max_length:
        raise ConfigError(
            f"{space.eval.max_length} tokens cannot hold the answers of task '{task}' ({longest} tokens): lm-eval "
            f"would fail every evaluation; use at least {longest}",
            file=space.source_path,
            field="eval.max_length",
        )
    return f"eval.max_length {space.eval.max_length} holds the longest answer ({longest} tokens)"
