"""The evaluator table and the one place an evaluator is built (CandidateWorker asks here).

Adding an evaluator: a module with a builder and a preflight check (see EvaluatorKind), and one
line in EVALUATORS; a space picks it with `eval.kind`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.evaluate.harness import build_task_evaluator
from evomerge.evaluate.harness_checks import check_tasks
from evomerge.evaluate.protocol import Evaluator, EvaluatorKind
from evomerge.store.states import Split
from evomerge.suggest import did_you_mean

if TYPE_CHECKING:
    from evomerge.config.space import SearchSpace

EVALUATORS: dict[str, EvaluatorKind] = {
    "lm_eval": EvaluatorKind(build=build_task_evaluator, check=check_tasks),
}


def evaluator_kind(space: SearchSpace) -> EvaluatorKind:
    """The table entry `eval.kind` names; ConfigError on that field for an unknown name."""
    kind = EVALUATORS.get(space.eval.kind)
    if kind is None:
        hint = did_you_mean(space.eval.kind, EVALUATORS)
        raise ConfigError(
            f"unknown evaluator '{space.eval.kind}' (choose from: {', '.join(EVALUATORS)}){hint}",
            file=space.source_path,
            field="eval.kind",
        )
    return kind


def search_tasks(space: SearchSpace) -> list[str]:
    return list(dict.fromkeys(o.task for o in space.objectives))


def selection_tasks(space: SearchSpace) -> list[str]:
    return list(dict.fromkeys(o.selection_task for o in space.objectives if o.selection_task))


def make_evaluator(
    space: SearchSpace, split: Split | str, *, tokenizer: Any, device: str, verbose: bool = False
) -> Evaluator | None:
    """The evaluator of the objectives' tasks on `split` (None: no objective has a selection_task).

    A task or setting the evaluator refuses is a ConfigError on `objectives`.
    """
    split = Split(split)
    tasks = search_tasks(space) if split is Split.SEARCH else selection_tasks(space)
    if not tasks:
        return None
    limit = space.eval.limit if split is Split.SEARCH else space.eval.selection_limit
    kind = evaluator_kind(space)
    try:
        return kind.build(space, tasks, limit=limit, tokenizer=tokenizer, device=device, verbose=verbose)
    except ValueError as exc:
        raise ConfigError(str(exc), file=space.source_path, field="objectives") from None
