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
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from evomerge.config.space import SearchSpace

Scores = dict[str, dict[str, float]]  # task -> metric -> value (NaN where there is no number)


class Evaluator(Protocol):
    def evaluate(self, model: Any) -> Scores:
        """Score `model` (a `transformers` causal LM) on every task this evaluator was built for."""
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
