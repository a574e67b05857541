"""Estimated full-set scores from a few anchor items per task (`eval.estimator: {kind: irt}`).

A study is calibrated once (evomerge.search.calibration): the reference models and a few
space-filling merges are scored on every item, a 2PL IRT model is fitted per objective task and
anchor items are chosen (evomerge.evaluate.irt). `IrtCalibration` holds the result as plain data
(JSON in the study, so a resumed study never calibrates again); `IrtEstimator` wraps an item
evaluator so that a candidate is scored on the anchors only and reported with estimated
full-set values. Every estimate is kept beside the chosen one under `metric|anchor`, `metric|p_irt`
and `metric|gp_irt`, so the trial store shows all three.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from evomerge.evaluate import irt
from evomerge.evaluate.protocol import ItemEvaluator, ItemIds, ItemScores, Scores

METHODS = ("anchor", "p_irt", "gp_irt")
# Per-item metrics lm-eval scores 0 or 1: the only ones a 2PL model describes.
BINARY_METRICS = frozenset({"acc", "acc_norm", "exact_match", "acc_mutual_info"})
EVALUATED = "items|evaluated"  # the items a trial was scored on, per task (its anchors)
FULL = "full"  # suffix of the full-set value recorded when an estimated trial is re-scored


def estimate_key(metric: str, method: str) -> str:
    """Where a trial's scores keep one estimator's value (or, with FULL, the full-set value) of `metric`."""
    return f"{metric}|{method}"


def is_binary_metric(metric: str) -> bool:
    return metric.split(",", 1)[0] in BINARY_METRICS


@dataclass(frozen=True)
class TaskCalibration:
    """One task's fitted items (`a`, `b` per doc id in `items`), anchors (doc ids) and their weights."""

    metric: str
    items: list[int]
    a: list[float]
    b: list[float]
    anchors: list[int]
    weights: list[float]
    lam: float  # gp-IRT's weight on the anchor estimate

    def _fit(self) -> tuple[irt.ItemFit, irt.Anchors]:
        position = {doc: i for i, doc in enumerate(self.items)}
        fit = irt.ItemFit(
            a=torch.tensor(self.a, dtype=torch.float64),
            b=torch.tensor(self.b, dtype=torch.float64),
            theta=torch.zeros(0, dtype=torch.float64),
        )
        anchors = irt.Anchors(
            index=torch.tensor([position[doc] for doc in self.anchors]),
            weight=torch.tensor(self.weights, dtype=torch.float64),
        )
        return fit, anchors

    def estimates(self, anchor_values: Sequence[Mapping[int, float]]) -> dict[str, torch.Tensor]:
        """Each method's estimate (m,) for m candidates, given each one's value on every anchor doc id."""
        missing = [doc for doc in self.anchors if any(doc not in values for values in anchor_values)]
        if missing:
            raise ValueError(f"no score for anchor item {missing[0]} (the evaluator scored other items)")
        y = torch.tensor([[values[doc] for doc in self.anchors] for values in anchor_values], dtype=torch.float64)
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError(f"metric {self.metric} gave a non-binary item value; the IRT estimator needs 0 or 1")
        fit, anchors = self._fit()
        return {
            "anchor": irt.anchor_estimate(anchors, y),
            "p_irt": irt.p_irt_estimate(fit, anchors, y),
            "gp_irt": irt.gp_irt_estimate(fit, anchors, y, self.lam),
        }


@dataclass(frozen=True)
class IrtCalibration:
    """A study's calibration: per objective task its fit and anchors, the estimator in use, who it was fitted on."""

    method: str
    tasks: dict[str, TaskCalibration]
    subjects: list[str] = field(default_factory=list)

    def anchor_items(self) -> ItemIds:
        return {task: list(cal.anchors) for task, cal in self.tasks.items()}

    def anchor_count(self) -> int:
        return sum(len(cal.anchors) for cal in self.tasks.values())

    def item_count(self) -> int:
        return sum(len(cal.items) for cal in self.tasks.values())

    def estimate_scores(self, item_scores: ItemScores) -> Scores:
        """`{task: {metric: chosen estimate, metric|anchor: ..., metric|p_irt: ..., metric|gp_irt: ...,
        items|evaluated: anchor count}}`."""
        scores: Scores = {}
        for task, cal in self.tasks.items():
            values = item_scores.get(task, {}).get(cal.metric)
            if values is None:
                raise ValueError(f"the evaluator gave no per-item '{cal.metric}' for task '{task}'")
            estimates = {method: float(value[0]) for method, value in cal.estimates([values]).items()}
            scores[task] = (
                {cal.metric: estimates[self.method]}
                | {estimate_key(cal.metric, method): value for method, value in estimates.items()}
                | {EVALUATED: float(len(cal.anchors))}
            )
        return scores

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "subjects": list(self.subjects),
            "tasks": {t: asdict(c) for t, c in self.tasks.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IrtCalibration:
        tasks = {task: TaskCalibration(**cal) for task, cal in data["tasks"].items()}
        return cls(method=data["method"], tasks=tasks, subjects=list(data.get("subjects", [])))


def calibrate(
    subjects: Mapping[str, ItemScores],
    metrics: Mapping[str, str],
    *,
    anchors: int,
    method: str = "gp_irt",
    cluster_on: str = "irt",
    seed: int = 0,
) -> IrtCalibration:
    """Fit each task of `metrics` (task -> metric) on the subjects' per-item values (every subject
    scored on the same items of that task) and choose up to `anchors` anchor items per task."""
    if method not in METHODS:
        raise ValueError(f"unknown estimator method {method!r} (choose from: {', '.join(METHODS)})")
    if len(subjects) < 2:
        raise ValueError("calibrating the IRT estimator needs at least two scored models")
    tasks = {}
    for task, metric in metrics.items():
        per_subject = [item_scores.get(task, {}).get(metric) for item_scores in subjects.values()]
        if any(values is None for values in per_subject):
            raise ValueError(f"a calibration model has no per-item '{metric}' for task '{task}'")
        items = sorted(per_subject[0])
        if any(sorted(values) != items for values in per_subject):
            raise ValueError(f"the calibration models were scored on different items of task '{task}'")
        responses = torch.tensor([[values[doc] for doc in items] for values in per_subject], dtype=torch.float64)
        try:
            fit = irt.fit_2pl(responses)
        except ValueError as error:
            raise ValueError(f"task '{task}', metric '{metric}': {error}") from None
        chosen = irt.choose_anchors(irt.item_embedding(fit, responses, cluster_on), anchors, seed=seed)
        tasks[task] = TaskCalibration(
            metric=metric,
            items=items,
            a=fit.a.tolist(),
            b=fit.b.tolist(),
            anchors=[items[i] for i in chosen.index.tolist()],
            weights=chosen.weight.tolist(),
            lam=irt.choose_lambda(fit, responses, anchors=anchors, cluster_on=cluster_on, seed=seed),
        )
    return IrtCalibration(method=method, tasks=tasks, subjects=list(subjects))


class IrtEstimator:
    """An evaluator that scores only the anchors and reports estimated full-set values.

    `evaluate(model)` runs the wrapped evaluator on the anchor items; `evaluate(model, items=...)`
    passes through unchanged (an explicit item set is scored as asked, e.g. for a full re-score).
    """

    def __init__(self, inner: ItemEvaluator, calibration: IrtCalibration):
        if not isinstance(inner, ItemEvaluator):
            raise ValueError("the IRT estimator needs an evaluator that scores single items (eval.kind: lm_eval)")
        self.inner = inner
        self.calibration = calibration

    def evaluate(self, model: Any, items: ItemIds | None = None) -> Scores:
        if items is not None:
            return self.inner.evaluate(model, items)
        _, item_scores = self.inner.evaluate_items(model, self.calibration.anchor_items())
        return self.calibration.estimate_scores(item_scores)


def fidelity(estimated: Sequence[float], full: Sequence[float]) -> dict[str, float]:
    """Spearman, Kendall and mean absolute error of estimates against full-set values."""
    x = torch.tensor(list(estimated), dtype=torch.float64)
    y = torch.tensor(list(full), dtype=torch.float64)
    return {
        "spearman": irt.spearman(x, y),
        "kendall": irt.kendall(x, y),
        "mae": float((x - y).abs().mean()) if len(x) else float("nan"),
        "n": len(x),
    }
