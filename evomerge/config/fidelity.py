"""`eval.fidelity`: successive halving over item budgets (rungs of items per task, and eta).

A rung is a number of items per task (a whole number), a fraction of each task's items in
(0, 1), or `all`. The full budget is always the last rung (added when not written), since only
full-budget scores make the front. What each rung means in items is resolved per task once the
tasks' sizes are known (`evomerge.search.fidelity.RungLadder`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from evomerge.config.base import StrictModel
from evomerge.config.numbers import Number, coerce_number

FULL = "all"

# lm-eval metrics scored per item as right (1) or wrong (0): what `cap` can bound.
BOUNDED_METRICS = ("acc", "acc_norm", "acc_bytes", "acc_mutual_info", "exact_match")


def item_bounds(metric: str) -> tuple[float, float] | None:
    """The lowest and highest value one item can score on `metric` ("acc,none"), None if unknown."""
    return (0.0, 1.0) if metric.split(",")[0].strip() in BOUNDED_METRICS else None


class FidelitySpec(StrictModel):
    rungs: list[int | float | str]  # e.g. [25, 100, all] or [0.1, 0.3, all]; ascending
    eta: Number = Field(3.0, gt=1)  # keep the top 1/eta of the trials that reached a rung
    # How a multi-objective study ranks a rung: non-domination rank, then the weighted sum
    # ("pareto"), or the weighted sum alone ("weighted": when the weighted score is what you want,
    # e.g. the mean over skills, and parents that each win one objective should not hold the top places).
    promote_by: Literal["pareto", "weighted"] = "pareto"
    # Who decides who goes up: evomerge's rule (any study), or one of optuna's pruners, fed the
    # rungs as intermediate values (single-objective studies only: optuna's `Trial.report` refuses
    # multi-objective ones). `evomerge.search.pruners` says what each is told.
    pruner: Literal["evomerge", "successive_halving", "hyperband", "wilcoxon"] = "evomerge"
    p_threshold: Number = Field(0.1, gt=0, lt=1)  # wilcoxon: stop a trial when p < this against the best
    # Which items the low rungs score: a random draw from search.seed ("random"), or first the
    # items the best reference model (per task) answers with the smallest margin ("margin":
    # multiple-choice tasks; others keep the random order). Low rungs then rank candidates on the
    # items that separate them, and their scores run below the full-set means.
    order: Literal["random", "margin"] = "random"
    # Race the best trials scored on every item, as SMAC's intensification races its incumbent: a
    # trial goes up to the full budget only if none of them is ahead of it on the items of the
    # rung below (their values there): a higher weighted score, or (promote_by pareto) values that
    # dominate its own. Fewer near-misses are scored in full; evomerge's rule only.
    race: bool = False
    # Adaptive capping (ParamILS/SMAC's, with item counts for run time): score the full budget in
    # steps as large as the rung below it, and stop a trial, at any rung or step, once even every
    # item still unscored answered right could not bring it level with the best trial scored in
    # full. Exact: a capped trial could not have become the best (or joined the front). Needs
    # objectives whose per-item values have known bounds (acc, acc_norm, exact_match, ...).
    cap: bool = False

    @field_validator("rungs", mode="before")
    @classmethod
    def _rungs(cls, value: Any) -> list[int | float | str]:
        if not isinstance(value, list) or not value:
            raise ValueError("expected a list of item budgets, e.g. [25, 100, all]")
        rungs: list[int | float | str] = []
        for entry in value:
            if isinstance(entry, str) and entry.strip().lower() == FULL:
                rungs.append(FULL)
                continue
            number = coerce_number(entry)
            if 0 < number < 1:
                rungs.append(float(number))
            elif number >= 1 and number.is_integer():
                rungs.append(int(number))
            else:
                raise ValueError(
                    f"a rung is a whole number of items (>= 1), a fraction in (0, 1) or 'all', got {entry!r}"
                )
        if FULL in rungs[:-1]:
            raise ValueError("'all' (the full budget) can only be the last rung")
        partial = [r for r in rungs if r != FULL]
        if not partial:
            raise ValueError("give at least one budget below 'all', e.g. [25, all]")
        if len({type(r) for r in partial}) > 1:
            raise ValueError(f"give every rung as item counts or every rung as fractions, not both: {value!r}")
        if any(b <= a for a, b in zip(partial, partial[1:], strict=False)):
            raise ValueError(f"rungs must grow strictly, got {value!r}")
        return [*partial, FULL]
