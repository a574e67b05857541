"""Successive halving over item budgets (`eval.fidelity`): the rungs, their items, and who goes up.

The items. Each leaf task's doc ids are shuffled once per study from `search.seed` and stored in
the trial store (`evomerge_item_orders`), so a resumed run and every worker use the same order.
With `order: margin` that shuffle is then sorted by the answer margin of the reference model that
scores the task best, smallest first (`evomerge.evaluate.margins`): near the top of a search the
items every good merge answers right tell candidates apart no better than a coin, and the ones the
expert barely gets right are the ones a merge loses first.
Rung k scores the first n_k ids of that order: the budgets are nested, and a promoted trial
scores only the ids between n_(k-1) and n_k. Its score at rung k is the mean of its per-item
values over the union, which is exact for metrics that lm-eval aggregates as a mean; any other
aggregation is refused at the first rung that shows it (`check_means`).

The promotion rule (asynchronous, no generation barrier; optuna's SuccessiveHalvingPruner makes
the same decide-once choice). When a trial finishes rung k < top, let R be the trials that reached
rung k so far, itself included, failed ones left out (a retried genome takes their place). Sort R
best first by
- the weighted, direction-signed sum of the objectives (`scalarize`) in a single-objective study
  (one objective, or cmaes over their weighted sum);
- in a multi-objective study: non-domination rank first (rank 0 is R's Pareto front, rank 1 the
  front of the rest, ...), then the weighted sum within a rank; or the weighted sum alone with
  `promote_by: weighted`.
Ties go to the earlier arrival: a trial has to beat a rival, not match it. The trial goes up to
rung k+1 iff fewer than max(1, floor(|R| / eta)) other members of R sort before it or tie with it
(they all arrived earlier); otherwise it stops at rung k. The first trial at a rung therefore
always goes up, and a trial is judged once, on arrival, never recalled later.

With `race`, a trial at the last rung below the full budget must also keep up with the best
trials already scored in full (`behind_the_best`): the eta rule alone promotes against every
trial at the rung, so once the sampler proposes good merges most near-misses are scored in full.

With `cap` (adaptive capping, as ParamILS and SMAC cap a run's time), the top rung is scored in
steps as large as the rung below it, and a trial stops, after any rung or step, once the best
trials scored in full would stay ahead of it even if every item it has not scored yet went its way
(`out_of_reach`). That is exact, unlike `race`: a capped trial could not have become the best or
joined the front. It is stored as stopped at the last rung it finished.

Why `promote_by: weighted` exists: with four skills as objectives, each parent alone is on the
rung's Pareto front (it wins its own skill), so under Pareto ranking the parents and other
specialists hold the few top places and a strong all-rounder seen later is stopped
(`results/fitness.md` shows what that costs on the demo).

This rule works for every study. A single-objective study may hand the decision to one of
optuna's pruners instead (`pruner: successive_halving | hyperband | wilcoxon`, see
`evomerge.search.pruners`); they cannot decide for a multi-objective one (`Trial.report` raises).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from evomerge.config.fidelity import item_bounds
from evomerge.errors import ConfigError, EvomergeError
from evomerge.search.front import objective_values, scalarize
from evomerge.search.pareto import pareto_front

if TYPE_CHECKING:
    from evomerge.config.fidelity import FidelitySpec
    from evomerge.config.space import SearchSpace
    from evomerge.evaluate.protocol import ItemIds, ItemScores, Margins, Scores

MEAN_TOLERANCE = 1e-6  # a reported score further than this from its items' mean is not a mean
TIE_TOLERANCE = 1e-9  # weighted sums of equal item counts, summed in another order, differ by rounding


class FidelityError(EvomergeError):
    """The evaluator or an objective's metric cannot run successive halving (a setup problem)."""


def draw_item_order(
    item_ids: Mapping[str, Sequence[int]], seed: int, margins: Margins | None = None
) -> dict[str, list[int]]:
    """Each task's doc ids in a fixed order: one random permutation per task, from the seed and the
    task's name (so adding a task does not reshuffle the others); for a task with a margin for
    every id, that permutation sorted by the margin's size, smallest first (ties keep it)."""
    order = {}
    for task, ids in item_ids.items():
        rng = np.random.default_rng([int(seed), zlib.crc32(task.encode())])
        shuffled = [int(ids[i]) for i in rng.permutation(len(ids))]
        by_doc = (margins or {}).get(task, {})
        if shuffled and all(doc in by_doc for doc in shuffled):
            shuffled.sort(key=lambda doc: abs(by_doc[doc]))  # stable: ties keep the random order
        order[task] = shuffled
    return order


def study_item_order(
    store,
    space: SearchSpace,
    item_ids: Mapping[str, Sequence[int]],
    margins: Callable[[], Margins] | None = None,
) -> dict[str, list[int]]:
    """The study's stored order, drawn and stored on the first run (`margins()` is asked then, with
    `order: margin`); a stored order that no longer fits the tasks' items (eval.limit or the tasks
    changed) is an error, not silently redrawn."""
    stored = store.item_order(space.study_name)
    if not stored:
        order = draw_item_order(item_ids, space.search.seed, margins() if margins is not None else None)
        store.save_item_order(space.study_name, order)
        return order
    for task, ids in item_ids.items():
        if sorted(stored.get(task, [])) != sorted(ids):
            raise ConfigError(
                f"study '{space.study_name}' stored an item order for task '{task}' that does not match its "
                f"items now ({len(stored.get(task, []))} stored, {len(ids)} now): keep eval.limit and the tasks, "
                "or set search.study_name to start a new study",
                file=space.source_path,
                field="eval.fidelity",
            )
    return {task: stored[task] for task in item_ids}


def task_metrics(space: SearchSpace) -> dict[str, str]:
    """Each objective's task -> its metric (the first objective's, where two share a task): what
    decides a task's answer margins."""
    metrics: dict[str, str] = {}
    for objective in space.objectives:
        metrics.setdefault(objective.task, objective.metric)
    return metrics


def experts(space: SearchSpace, references: Mapping[str, Scores]) -> dict[str, str]:
    """Each objective's task -> the reference model that scores it best (by the objective's
    direction; the first name wins a tie, NaN never wins): whose margins order the task's items."""
    chosen = {}
    for objective in space.objectives:
        sign = 1.0 if objective.direction == "maximize" else -1.0
        best = None
        for name in sorted(references):
            value = float(references[name].get(objective.task, {}).get(objective.metric, math.nan))
            if not math.isnan(value) and (best is None or sign * value > best[0]):
                best = (sign * value, name)
        if best is not None:
            chosen.setdefault(objective.task, best[1])
    return chosen


@dataclass(frozen=True)
class RungLadder:
    """The rungs in items: `sizes[k][task]` = how many of `order[task]` rung k scores."""

    order: dict[str, list[int]]
    sizes: list[dict[str, int]]
    # With `cap`: where the top rung pauses to check its trial, each as far past the last as the
    # rung below the top is large (20, 40, 60, 80 of 100 after a rung of 20); empty without `cap`.
    steps: list[dict[str, int]] = field(default_factory=list)

    @classmethod
    def build(cls, spec: FidelitySpec, order: Mapping[str, list[int]], *, source=None) -> RungLadder:
        sizes = []
        for rung in spec.rungs:
            sizes.append({task: _rung_size(rung, len(ids)) for task, ids in order.items()})
        for k in range(1, len(sizes)):
            if sum(sizes[k].values()) <= sum(sizes[k - 1].values()):
                most = max(len(ids) for ids in order.values())
                raise ConfigError(
                    f"rung {k} ({spec.rungs[k]}) adds no item to rung {k - 1} ({spec.rungs[k - 1]}): "
                    f"the largest task has {most} items",
                    file=source,
                    field="eval.fidelity.rungs",
                )
        steps = []
        if spec.cap:
            below, full = sizes[-2], sizes[-1]
            for k in range(2, max(math.ceil(full[t] / below[t]) for t in full)):
                steps.append({t: min(full[t], k * below[t]) for t in full})
        return cls({task: list(ids) for task, ids in order.items()}, sizes, steps)

    @property
    def top(self) -> int:
        return len(self.sizes) - 1

    def new_items(self, rung: int) -> ItemIds:
        """The doc ids rung `rung` adds to the rung below it (all of rung 0's for rung 0)."""
        below = self.sizes[rung - 1] if rung > 0 else {}
        return {task: ids[below.get(task, 0) : self.sizes[rung][task]] for task, ids in self.order.items()}

    def step_items(self, step: int) -> ItemIds:
        """The doc ids the top rung's step `step` adds (0: from the rung below; the last step, number
        len(steps), ends at the full budget; without `cap` its one step is the whole top rung)."""
        low, high = self._step_sizes()[step : step + 2]
        return {task: ids[low[task] : high[task]] for task, ids in self.order.items()}

    def step_total(self, step: int) -> int:
        """Items scored once the top rung's step `step` is done, every task together."""
        return sum(self._step_sizes()[step + 1].values())

    def _step_sizes(self) -> list[dict[str, int]]:
        """Items per task where the top rung starts, pauses (`steps`) and ends."""
        return [self.sizes[self.top - 1], *self.steps, self.sizes[self.top]]

    def items(self, rung: int) -> int:
        """Items scored up to and including `rung`, every task together."""
        return sum(self.sizes[rung].values())

    def describe(self, rung: int) -> str:
        """'rung 1/2 (25 items per task)', or per task where the tasks differ."""
        counts = set(self.sizes[rung].values())
        if len(counts) == 1:
            per = f"{counts.pop()} items per task"
        else:
            per = ", ".join(f"{task} {n}" for task, n in self.sizes[rung].items()) + " items"
        return f"rung {rung}/{self.top} ({per})"


def check_recorded_rungs(space: SearchSpace, ladder: RungLadder, number: int, rungs: Mapping[int, tuple]) -> None:
    """A resumed study's rungs must be the ones its trials were judged at (same items per rung)."""
    for rung, (items, _) in rungs.items():
        if rung > ladder.top or items != ladder.items(rung):
            raise ConfigError(
                f"study '{space.study_name}' scored trial {number} at rung {rung} on {items} items, these rungs "
                f"give {ladder.items(rung) if rung <= ladder.top else 'no such rung'}: keep the study's rungs, "
                "or set search.study_name to start a new study",
                file=space.source_path,
                field="eval.fidelity.rungs",
            )


def _rung_size(rung: int | float | str, total: int) -> int:
    if isinstance(rung, str):  # "all"
        return total
    if isinstance(rung, float):
        return min(total, max(1, math.ceil(rung * total)))
    return min(total, rung)


def merge_item_scores(scored: ItemScores, new: ItemScores) -> ItemScores:
    """The union of two item score sets (a doc id scored twice keeps the newer value)."""
    merged = {task: {metric: dict(values) for metric, values in metrics.items()} for task, metrics in scored.items()}
    for task, metrics in new.items():
        for metric, values in metrics.items():
            merged.setdefault(task, {}).setdefault(metric, {}).update(values)
    return merged


def mean_scores(item_scores: ItemScores) -> Scores:
    """Each task's metrics as the mean of its items' values (NaN items make a NaN mean)."""
    return {
        task: {metric: sum(values.values()) / len(values) for metric, values in metrics.items() if values}
        for task, metrics in item_scores.items()
    }


def check_means(space: SearchSpace, scores: Scores, item_scores: ItemScores) -> None:
    """Every objective's reported score is the mean of its items' values, else FidelityError."""
    for objective in space.objectives:
        values = item_scores.get(objective.task, {}).get(objective.metric)
        reported = scores.get(objective.task, {}).get(objective.metric)
        if not values:
            raise FidelityError(
                f"eval.fidelity: the evaluator gave no per-item values of {objective.task} {objective.metric} "
                "(successive halving needs each item's value: use a leaf task, not a group)"
            )
        if reported is None:
            continue  # outcome_values reports a missing task or metric
        average = sum(values.values()) / len(values)
        if not (math.isnan(reported) and math.isnan(average)) and abs(reported - average) > MEAN_TOLERANCE:
            raise FidelityError(
                f"eval.fidelity: {objective.task} {objective.metric} is not a mean over items (lm-eval reported "
                f"{reported:.6g}, its items average {average:.6g}); successive halving adds rungs up as means, "
                "so drop eval.fidelity for this objective's metric"
            )


def rung_values(space: SearchSpace, item_scores: ItemScores) -> tuple[Scores, list[float]]:
    """A trial's scores over every item it has scored, and its objective values from them."""
    scores = mean_scores(item_scores)
    return scores, objective_values(space, scores)


def sort_keys(space: SearchSpace, points: Sequence[Sequence[float]]) -> list[tuple[int, float]]:
    """Each point's (non-domination rank, -weighted sum): smaller sorts first (see the module doc)."""
    weighted = [-scalarize(space, p) for p in points]
    if _by_weighted(space):
        return [(0, w) for w in weighted]
    directions = [o.direction for o in space.objectives]
    ranks = [0] * len(points)
    left = list(range(len(points)))
    rank = 0
    while left:
        front = pareto_front([points[i] for i in left], directions)
        if not front:  # only NaN rows left: they rank last together
            for i in left:
                ranks[i] = rank
            break
        for j in front:
            ranks[left[j]] = rank
        chosen = set(front)
        left = [i for j, i in enumerate(left) if j not in chosen]
        rank += 1
    return list(zip(ranks, weighted, strict=True))


def promoted(space: SearchSpace, values: Sequence[float], rivals: Sequence[Sequence[float]], eta: float) -> bool:
    """Whether a trial with `values` at a rung goes up, given the values of the trials that reached
    the rung before it (`rivals`); a tie counts as a rival ahead."""
    keys = sort_keys(space, [list(values), *[list(r) for r in rivals]])
    ahead = sum(1 for key in keys[1:] if key <= keys[0])
    keep = max(1, math.floor(len(keys) / eta))
    return ahead < keep


def behind_the_best(
    space: SearchSpace,
    values: Sequence[float],
    reached: Mapping[int, Mapping[int, Sequence[float]]],
    rung: int,
    top: int,
) -> bool:
    """`race`: whether a best fully-scored trial is ahead of `values` on rung `rung`'s items.

    The best: by the weighted sum (single-objective study, or `promote_by: weighted`), else the
    Pareto front, of the trials' full-budget values (`reached[top]`). Ahead: a higher weighted sum
    at the rung, or values there that dominate `values`; a tie is not ahead (near the ceiling the
    best often scores every first-rung item right, and an equal trial must still go up).
    """
    full = {n: v for n, v in reached.get(top, {}).items() if n in reached.get(rung, {})}
    return any(_ahead(space, reached[rung][n], values) for n in _best(space, full))


def out_of_reach(
    space: SearchSpace,
    item_scores: ItemScores,
    totals: Mapping[str, int],
    full: Mapping[int, Sequence[float]],
) -> bool:
    """`cap`: whether a best fully-scored trial (`full`: number -> values) stays ahead of a trial
    that scored `item_scores`, even if each of its unscored items (`totals`: items per task) takes
    the best value an item can have. Exact: such a trial cannot become the best, nor join the front.
    """
    hopes = []
    for objective in space.objectives:
        values = item_scores[objective.task][objective.metric]
        low, high = item_bounds(objective.metric)
        best_item = high if objective.direction == "maximize" else low
        total = totals[objective.task]
        hopes.append((sum(values.values()) + (total - len(values)) * best_item) / total)
    return any(_ahead(space, full[n], hopes) for n in _best(space, full))


def _by_weighted(space: SearchSpace) -> bool:
    spec = space.eval.fidelity
    return not space.multi_objective or (spec is not None and spec.promote_by == "weighted")


def _best(space: SearchSpace, full: Mapping[int, Sequence[float]]) -> list[int]:
    """The best of the trials scored in full: the highest weighted sum (the earliest of equals), or
    (promote_by pareto) the Pareto front."""
    numbers = list(full)
    if not numbers:
        return []
    if _by_weighted(space):
        return [max(numbers, key=lambda n: (scalarize(space, full[n]), -n))]
    directions = [o.direction for o in space.objectives]
    return [numbers[i] for i in pareto_front([full[n] for n in numbers], directions)]


def _ahead(space: SearchSpace, rival: Sequence[float], values: Sequence[float]) -> bool:
    """A higher weighted sum (beyond rounding), or (promote_by pareto) values that dominate; a tie is
    not ahead."""
    if _by_weighted(space):
        return scalarize(space, rival) > scalarize(space, values) + TIE_TOLERANCE
    directions = [o.direction for o in space.objectives]
    return pareto_front([list(rival), list(values)], directions) == [0]


def rung_summary(store, space: SearchSpace) -> list[str]:
    """What `evomerge front` and the study note say of the rungs: how many trials reached each and
    went up (a trial capped inside the top rung went up to it), the rung every stopped trial ended
    at, and which of them capping stopped, after how many items (none for a full-fidelity study)."""
    rungs = store.rungs(space.study_name)
    if not rungs:
        return []
    status = {r.number: r.status for r in store.trials(space.study_name)}
    rungs = {n: r for n, r in rungs.items() if status.get(n) != "failed"}
    spec = space.eval.fidelity
    top = len(spec.rungs) - 1 if spec is not None else max(max(r) for r in rungs.values())
    capped = {n: c for n, c in store.capped(space.study_name).items() if status.get(n) == "pruned"}
    parts = []
    for k in range(top + 1):
        there = [n for n, r in rungs.items() if k in r]
        if not there:
            continue
        items = rungs[there[0]][k][0]
        # Up: it finished the next rung, or capping stopped it past this rung's items (inside the top rung).
        went_up = sum(1 for n in there if k + 1 in rungs[n] or capped.get(n, (0, 0))[0] > rungs[n][k][0])
        label = f"rung {k}{' (full)' if k == top else ''}, {items} items"
        parts.append(f"{label}: {len(there)} trials" + (f", {went_up} went up" if k < top else ""))
    how = ""
    if spec is not None:
        settings = [f"eta {spec.eta:g}"]
        settings += ["items by margin"] if spec.order == "margin" else []
        settings += ["racing the best"] if spec.race else []
        settings += ["capping"] if spec.cap else []
        how = f" ({', '.join(settings)})"
    lines = [f"Successive halving{how}: " + " · ".join(parts) + "."]
    stopped: dict[int, list[int]] = {}
    for number, reached in rungs.items():
        if status.get(number) == "pruned" and number not in capped:
            stopped.setdefault(max(reached), []).append(number)
    if stopped:
        lines.append(
            " ".join(
                f"Stopped at rung {k}: trial{'s' if len(ns) > 1 else ''} {', '.join(map(str, sorted(ns)))}."
                for k, ns in sorted(stopped.items())
            )
        )
    if capped:
        each = ", ".join(f"{n} after {scored} of {full} items" for n, (scored, full) in sorted(capped.items()))
        lines.append(f"Capped, the best out of reach: trial{'s' if len(capped) > 1 else ''} {each}.")
    return lines
