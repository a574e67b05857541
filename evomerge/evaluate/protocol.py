"""The evaluator interface: what a worker asks of whatever scores a merged model.

An evaluator is built once per worker and split (the expensive loading happens then) and called
once per candidate, with the same model object whose weights were changed in place. Its scores
are `{task: {metric: value}}`; an objective names one `task` and `metric` of them, so the search
loop, the trial store and export never know which evaluator produced a score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from evomerge.config.space import SearchSpace

Scores = dict[str, dict[str, float]]  # task -> metric -> value (NaN where there is no number)
ItemIds = dict[str, list[int]]  # leaf task -> the lm-eval doc ids to score, in order
ItemScores = dict[str, dict[str, dict[int, float]]]  # leaf task -> metric -> doc id -> the item's value
Margins = dict[str, dict[int, float]]  # leaf task -> doc id -> the answer's margin (evaluate/margins.py)


class Evaluator(Protocol):
    def evaluate(self, model: Any, items: ItemIds | None = None) -> Scores:
        """Score `model` (a `transformers` causal LM) on every task this evaluator was built for.

        `items`: score only these documents of each named leaf task (the evaluator's `limit` is
        then ignored for them); None scores every item the evaluator was built for.
        """
        ...


@runtime_checkable
class ItemEvaluator(Evaluator, Protocol):
    """An evaluator that can also say which items it scores and what each item scored.

    Cheap-fitness schemes (item budgets, IRT estimates) need both; an evaluator without them
    can still run a full-fidelity search.
    """

    def item_ids(self) -> ItemIds:
        """Every doc id each leaf task scores at full budget (after `limit`), in lm-eval's order."""
        ...

    def evaluate_items(self, model: Any, items: ItemIds | None = None) -> tuple[Scores, ItemScores]:
        """`evaluate`'s scores plus each scored item's per-item metric values."""
        ...


@runtime_checkable
class MarginEvaluator(ItemEvaluator, Protocol):
    """An item evaluator that can also say how sure a model is of each item's answer
    (`evomerge.evaluate.margins`): what successive halving's `order: margin` asks of the references."""

    def evaluate_margins(self, model: Any, metrics: dict[str, str]) -> tuple[Scores, Margins]:
        """`evaluate`'s scores on every item and, per task in `metrics` (task -> metric), each
        doc's answer margin; tasks without one (not multiple choice) are left out."""
        ...


class EvaluatorBuilder(Protocol):
    def __call__(
        self,
        space: SearchSpace,
        tasks: list[str],
        *,
        limit: int | float | None,
        tokenizer: Any,
        device: str,
        verbose: bool,
    ) -> Evaluator:
        """An evaluator of `tasks` (the objectives' tasks of one split), `limit` items each; ValueError
        naming an unknown task or a bad setting."""
        ...


@dataclass(frozen=True)
class EvaluatorKind:
    """One entry of the evaluator table (evomerge.evaluate.factory.EVALUATORS), chosen by `eval.kind`.

    `check(space, tokenizer_dir)`: before any model loads, every objective's task and metric
    exist for this evaluator (ConfigError naming the field otherwise); returns the line
    `evomerge validate` prints.
    """

    build: EvaluatorBuilder
    check: Callable[[SearchSpace, Path | None], str]
