"""Pareto fronts, hypervolume and weighted scores over objective vectors.

Pure numpy, no optuna and no database, so the CLI's `front` and the benchmark scripts can use it
on values read back from the store.

Internally every objective is turned into a cost to minimise (maximised objectives negated);
callers always speak in the study's own directions.

Hypervolume is exact: a sweep in 2-D, slicing along one axis into 2-D sweeps in 3-D (O(n² log n)),
and for 4 or more objectives the WFG recursion (While, Bradstreet & Barone, "A Fast Way of
Calculating Exact Hypervolumes", IEEE TEC 2012): the volume of a set is the sum, point by point,
of what each point adds to the points after it, and what a point adds is its own box minus the
volume of the later points clipped to that box. Taking the points worst-first in the last
objective makes each clipped set a slab one dimension lower, so d objectives recurse down to the
3-D slicing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

_CHUNK = 512  # dominance checks compare a chunk of points against all: bounded memory


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices (ascending) of the points no other point dominates.

    A point dominates another when it is at least as good in every objective and better in one.
    Rows holding a NaN are never on the front (and dominate nothing); equal points do not
    dominate each other, so duplicates on the front are all kept.
    """
    costs = _costs(points, directions)
    usable = np.flatnonzero(~np.isnan(costs).any(axis=1))
    keep = _nondominated_mask(costs[usable])
    return [int(i) for i in usable[keep]]


def hypervolume(points: Sequence[Sequence[float]], directions: Sequence[str], reference: Sequence[float]) -> float:
    """The volume dominated by `points` and bounded by `reference` (exact, any dimension).

    `reference` is a point in the objectives' own units and directions, normally worse than
    anything interesting (0 accuracy for a maximised accuracy). A point that is not strictly
    better than the reference in every objective adds nothing; NaN rows are ignored.
    """
    costs = _costs(points, directions)
    ref = _reference(reference, directions)
    return _volume(_front_inside(costs, ref), ref)


def weighted_score(values: Sequence[float], directions: Sequence[str], weights: Sequence[float]) -> float:
    """Σ wᵢ·vᵢ with minimised objectives negated, so that larger is always better."""
    signs = _signs(directions)
    if not len(values) == len(weights) == len(signs):
        raise ValueError(
            f"{len(values)} values, {len(weights)} weights and {len(signs)} directions: give one of each per objective"
        )
    return float(sum(-s * float(w) * float(v) for v, s, w in zip(values, signs, weights)))


def hypervolume_history(
    values_in_order: Sequence[Sequence[float]],
    directions: Sequence[str],
    reference: Sequence[float],
) -> list[float]:
    """Hypervolume of the first k points, for k = 1..n: how fast a search covers the front.

    Incremental: a new point that is not dominated adds exactly its exclusive volume (its box
    minus the current front clipped to that box), so the whole history costs little more than
    the final hypervolume.
    """
    costs = _costs(values_in_order, directions)
    ref = _reference(reference, directions)
    front = np.empty((0, ref.size))
    volume = 0.0
    history: list[float] = []
    for point in costs:
        inside = not np.isnan(point).any() and bool((point < ref).all())
        if inside and not (front <= point).all(axis=1).any():
            if not np.isfinite(point).all():
                volume = math.inf
            elif math.isfinite(volume):
                volume += _exclusive(point, front, ref)
            front = np.vstack([front[~(point <= front).all(axis=1)], point])
        history.append(float(volume))
    return history


# ------------------------------------------------------------------- helpers


def _signs(directions: Sequence[Any]) -> np.ndarray:
    """+1 for a minimised objective, -1 for a maximised one (optuna's StudyDirection works too)."""
    signs = []
    for direction in directions:
        name = str(getattr(direction, "name", direction)).lower()
        if name not in ("maximize", "minimize"):
            raise ValueError(f"direction {direction!r}: use 'maximize' or 'minimize'")
        signs.append(1.0 if name == "minimize" else -1.0)
    if not signs:
        raise ValueError("no directions given: give one per objective")
    return np.array(signs)


def _costs(points: Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    signs = _signs(directions)
    array = np.asarray(points, dtype=float)
    if array.size == 0:
        return np.empty((0, signs.size))
    if array.ndim != 2 or array.shape[1] != signs.size:
        raise ValueError(
            f"points of shape {array.shape} with {signs.size} directions: "
            f"give one row per point and one column per objective"
        )
    return array * signs


def _reference(reference: Sequence[float], directions: Sequence[str]) -> np.ndarray:
    signs = _signs(directions)
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if ref.size != signs.size or not np.isfinite(ref).all():
        raise ValueError(f"reference {list(reference)!r}: give one finite value per objective ({signs.size})")
    return ref * signs


def _nondominated_mask(costs: np.ndarray) -> np.ndarray:
    """True for each row that no other row dominates (minimisation; equal rows all kept)."""
    n = costs.shape[0]
    keep = np.ones(n, dtype=bool)
    for start in range(0, n, _CHUNK):
        block = costs[start : start + _CHUNK]  # the candidates being judged
        no_worse = (costs[:, None, :] <= block[None, :, :]).all(axis=2)
        better = (costs[:, None, :] < block[None, :, :]).any(axis=2)
        keep[start : start + _CHUNK] = ~(no_worse & better).any(axis=0)
    return keep


def _front_inside(costs: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The distinct non-dominated rows strictly inside `ref`: the only ones adding volume."""
    inside = costs[~np.isnan(costs).any(axis=1)]
    inside = inside[(inside < ref).all(axis=1)]
    if inside.shape[0] > 1:
        inside = np.unique(inside, axis=0)
        inside = inside[_nondominated_mask(inside)]
    return inside


def _volume(front: np.ndarray, ref: np.ndarray) -> float:
    """Volume dominated by `front` (distinct, non-dominated, strictly inside `ref`)."""
    n, dims = front.shape
    if n == 0:
        return 0.0
    if not np.isfinite(front).all():
        return math.inf  # a point at -inf cost: an unbounded box
    if n == 1:
        return float(np.prod(ref - front[0]))
    if n == 2:  # inclusion–exclusion: both boxes minus their overlap
        overlap = np.prod(ref - front.max(axis=0))
        return float(np.prod(ref - front[0]) + np.prod(ref - front[1]) - overlap)
    if dims == 1:
        return float(ref[0] - front[:, 0].min())
    if dims == 2:
        return _volume_2d(front, ref)
    if dims == 3:
        return _volume_3d(front, ref)
    return _volume_wfg(front, ref)


def _volume_2d(points: np.ndarray, ref: np.ndarray) -> float:
    """Area dominated by any 2-D points (dominated and repeated points allowed)."""
    order = np.lexsort((points[:, 1], points[:, 0]))  # by x, ties by y
    xs, ys = points[order, 0], points[order, 1]
    best_before = np.minimum.accumulate(np.concatenate([[ref[1]], ys[:-1]]))
    steps = ys < best_before  # the staircase: each point lower than everything to its left
    xs, ys = xs[steps], ys[steps]
    widths = np.append(xs[1:], ref[0]) - xs
    return float(widths @ (ref[1] - ys))


def _volume_3d(points: np.ndarray, ref: np.ndarray) -> float:
    """Slice along z: between consecutive z values the cross-section is a 2-D area."""
    points = points[np.argsort(points[:, 2], kind="stable")]
    zs = np.append(points[:, 2], ref[2])
    total = 0.0
    for k in range(points.shape[0]):
        depth = zs[k + 1] - zs[k]
        if depth > 0:
            total += depth * _volume_2d(points[: k + 1, :2], ref[:2])
    return total


def _volume_wfg(front: np.ndarray, ref: np.ndarray) -> float:
    # Worst-first in the last objective: every later point is at least as good there, so a later
    # point clipped to this one's box sits at this one's last coordinate, and the clipped set's
    # volume is a slab: depth along the last axis times a volume in one dimension fewer.
    front = front[np.argsort(-front[:, -1], kind="stable")]
    total = 0.0
    for i, point in enumerate(front):
        own_box = float(np.prod(ref - point))
        later = front[i + 1 :, :-1]
        if later.shape[0]:
            clipped = _front_inside(np.maximum(later, point[:-1]), ref[:-1])
            own_box -= float(ref[-1] - point[-1]) * _volume(clipped, ref[:-1])
        total += own_box
    return total


def _exclusive(point: np.ndarray, others: np.ndarray, ref: np.ndarray) -> float:
    """Volume dominated by `point` and by none of `others`."""
    own_box = float(np.prod(ref - point))
    if others.shape[0] == 0:
        return own_box
    clipped = np.maximum(others, point)  # each other point's box, intersected with ours
    return own_box - _volume(_front_inside(clipped, ref), ref)
