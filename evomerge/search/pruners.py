"""optuna's pruners as the promotion rule of a single-objective halving study (`eval.fidelity.pruner`).

The rungs, the items and the stored rung values are evomerge's either way (`search.fidelity`);
only the decision at the end of a rung below the top moves to the pruner (`Trial.should_prune`).
What each is told, with `report_rung` at every rung, the top one included (so a complete trial
carries every intermediate value a later trial is compared with):
- `successive_halving`, `hyperband`: the study's value over every item scored so far (the weighted
  sum the study is told at the end), at step = those items, every task together. The pruner's
  first rung is evomerge's first (`min_resource`), its reduction factor is `eta`, and Hyperband's
  `max_resource` is the full set; optuna's rungs sit at min_resource * eta^k, so evomerge's rungs
  meet them exactly when each is eta times the one below.
- `wilcoxon`: each item's own contribution to that value (its objectives' signed weights times its
  value), at step = the item's place in the study's item order, so two trials are compared item by
  item on the items both scored (the nested order makes those the same items). It stops a trial
  when a Wilcoxon signed-rank test says it is worse than the best complete trial (`p_threshold`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from evomerge.search.front import told_values
from evomerge.search.pareto import weighted_score

if TYPE_CHECKING:
    from optuna.pruners import BasePruner

    from evomerge.config.space import SearchSpace
    from evomerge.evaluate.protocol import ItemScores
    from evomerge.search.fidelity import RungLadder


def make_pruner(space: SearchSpace, ladder: RungLadder) -> BasePruner | None:
    """The optuna pruner `eval.fidelity.pruner` names, fitted to the ladder; None for evomerge's rule."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.pruners import HyperbandPruner, SuccessiveHalvingPruner, WilcoxonPruner

    spec = space.eval.fidelity
    if spec is None or spec.pruner == "evomerge":
        return None
    if spec.pruner == "successive_halving":
        return SuccessiveHalvingPruner(min_resource=ladder.items(0), reduction_factor=int(spec.eta))
    if spec.pruner == "hyperband":
        return HyperbandPruner(
            min_resource=ladder.items(0), max_resource=ladder.items(ladder.top), reduction_factor=int(spec.eta)
        )
    with warnings.catch_warnings():  # optuna marks it experimental; README says so
        warnings.simplefilter("ignore", ExperimentalWarning)
        return WilcoxonPruner(p_threshold=spec.p_threshold)


def report_rung(trial, space: SearchSpace, ladder: RungLadder, rung: int, values, item_scores: ItemScores) -> None:
    """Tell the pruner of `trial` (an optuna Trial) what it reached at `rung` (see the module doc)."""
    if space.eval.fidelity.pruner != "wilcoxon":
        trial.report(told_values(space, values)[0], step=ladder.items(rung))
        return
    for step, value in item_contributions(space, ladder, rung, item_scores):
        trial.report(value, step=step)


def item_contributions(
    space: SearchSpace, ladder: RungLadder, rung: int, item_scores: ItemScores
) -> list[tuple[int, float]]:
    """(step, value) for each item `rung` adds: its place in the study's order (tasks one after
    another) and the signed, weighted sum of its values over the objectives that read it."""
    below = ladder.sizes[rung - 1] if rung > 0 else {}
    out, offset = [], 0  # offset: the task's first place in the study's order
    for task, ids in ladder.order.items():
        readers = [o for o in space.objectives if o.task == task]
        directions, weights = [o.direction for o in readers], [o.weight for o in readers]
        for place in range(below.get(task, 0), ladder.sizes[rung][task]):
            values = [item_scores[task][o.metric][ids[place]] for o in readers]
            out.append((offset + place, weighted_score(values, directions, weights)))
        offset += len(ids)
    return out
