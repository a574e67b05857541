"""The front of a study: objective values read from lm-eval scores, the Pareto front of completed
trials, the reference models' rows, and the pick of the best. Pure reads of the trial store, so
export, the report, the plot and the CLI use them without the search loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from evomerge.search.pareto import pareto_front, weighted_score
from evomerge.store.protocol import Scores
from evomerge.store.states import Split

if TYPE_CHECKING:
    from evomerge.config.space import SearchSpace
    from evomerge.store.protocol import TrialReader


def metric_value(scores: Scores, task: str, metric: str) -> float:
    """One metric of one task, or a KeyError naming what lm-eval did report."""
    if task not in scores:
        raise KeyError(f"lm-eval returned no results for task '{task}' (got: {', '.join(scores) or 'nothing'})")
    metrics = scores[task]
    if metric not in metrics:
        numeric = [m for m in metrics if "stderr" not in m]
        raise KeyError(f"task '{task}' has no metric '{metric}' (it reports: {', '.join(numeric)})")
    return float(metrics[metric])


def objective_values(space: SearchSpace, scores: Scores, *, split: Split | str = Split.SEARCH) -> list[float]:
    """Per-objective raw values (search tasks, or selection tasks when split='selection')."""
    values = []
    for objective in space.objectives:
        task = objective.task if split == "search" else objective.selection_task
        values.append(metric_value(scores, task, objective.metric) if task else math.nan)
    return values


def scalarize(space: SearchSpace, values: Sequence[float]) -> float:
    """Weighted sum of objective values, minimize objectives negated (larger is better)."""
    return weighted_score(values, [o.direction for o in space.objectives], [o.weight for o in space.objectives])


def told_values(space: SearchSpace, values: Sequence[float]) -> list[float]:
    """What optuna is told: every objective (multi-objective) or their weighted sum."""
    return list(values) if space.multi_objective else [scalarize(space, values)]


@dataclass
class FrontRow:
    """One model on the front (a trial or a reference), its objective values per split."""

    label: str  # "trial 12" or a reference model's name
    number: int | None  # trial number (None for references)
    search: list[float]
    selection: list[float] | None
    weights_hash: str | None = None

    def mean(self, which: Split | str = Split.SEARCH) -> float:
        values = self.search if which == "search" else self.selection
        if not values:
            return math.nan
        return sum(values) / len(values)


@dataclass
class SearchSummary:
    """What `run_search` returns: the study's counts, its front and references, and the pick."""

    study_name: str
    storage_url: str
    objective_names: list[str]
    n_complete: int
    n_failed: int
    front: list[FrontRow]
    references: list[FrontRow]
    best: FrontRow | None
    seconds: float
    space_path: str | None = None
    notes: list[str] = field(default_factory=list)
    n_pruned: int = 0  # stopped at a low rung of successive halving (eval.fidelity)


def compute_front(space: SearchSpace, store: TrialReader) -> list[FrontRow]:
    """The Pareto front of completed trials over the per-objective search values (one row per distinct model)."""
    search_scores = store.scores(space.study_name, "search")
    selection_scores = store.scores(space.study_name, "selection")
    rows: list[FrontRow] = []
    seen_hashes: set[str] = set()
    for record in store.trials(space.study_name, status="complete"):
        scores = search_scores.get(record.number)
        if not scores:
            continue
        if record.weights_hash and record.weights_hash in seen_hashes:
            continue  # the same merged model twice (a retried or re-enqueued genome)
        try:
            values = objective_values(space, scores)
        except KeyError:
            continue
        if any(math.isnan(v) for v in values):
            continue
        if record.weights_hash:
            seen_hashes.add(record.weights_hash)
        selection = None
        if record.number in selection_scores:
            try:
                selection = objective_values(space, selection_scores[record.number], split="selection")
            except KeyError:
                selection = None
        rows.append(FrontRow(f"trial {record.number}", record.number, values, selection, record.weights_hash))
    directions = [o.direction for o in space.objectives]
    keep = pareto_front([r.search for r in rows], directions)
    front = [rows[i] for i in keep]
    front.sort(key=lambda r: scalarize(space, r.search), reverse=True)
    return front


def reference_rows(space: SearchSpace, store: TrialReader) -> list[FrontRow]:
    """The base and the parents as they are: the points a merge has to beat."""
    search = store.references(space.study_name, "search")
    selection = store.references(space.study_name, "selection")
    rows = []
    for name, scores in search.items():
        try:
            values = objective_values(space, scores)
        except KeyError:
            continue
        chosen = None
        if name in selection:
            try:
                chosen = objective_values(space, selection[name], split="selection")
            except KeyError:
                chosen = None
        rows.append(FrontRow(name, None, values, chosen))
    return rows


def pick_best(space: SearchSpace, front: Sequence[FrontRow]) -> FrontRow | None:
    """Best by the weighted selection score when finalists were re-scored, else by the search score."""
    if not front:
        return None
    scored = [r for r in front if r.selection and not any(math.isnan(v) for v in r.selection)]
    if scored:
        return max(scored, key=lambda r: scalarize(space, r.selection))
    return max(front, key=lambda r: scalarize(space, r.search))
