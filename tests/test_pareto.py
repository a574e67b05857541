"""Pareto fronts and hypervolume: hand-computed cases, brute force, optuna as a second opinion."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from evomerge.search.pareto import (
    hypervolume,
    hypervolume_history,
    pareto_front,
    weighted_score,
)

MAX2, MIN2 = ["maximize"] * 2, ["minimize"] * 2


def brute_front(points, directions):
    """Quadratic textbook definition, in Python, for comparison."""
    signs = [1 if d == "minimize" else -1 for d in directions]
    costs = [[s * v for s, v in zip(signs, p)] for p in points]
    front = []
    for i, a in enumerate(costs):
        if any(math.isnan(v) for v in a):
            continue
        dominated = any(
            all(bj <= aj for aj, bj in zip(a, b)) and any(bj < aj for aj, bj in zip(a, b))
            for j, b in enumerate(costs)
            if j != i and not any(math.isnan(v) for v in b)
        )
        if not dominated:
            front.append(i)
    return front


def monte_carlo_hypervolume(costs, ref, samples, rng):
    """Fraction of uniform samples in [min, ref] that some point dominates, times that box."""
    costs = np.asarray(costs)
    low = costs.min(axis=0)
    draws = rng.uniform(low, ref, size=(samples, len(ref)))
    covered = (costs[None, :, :] <= draws[:, None, :]).all(axis=2).any(axis=1)
    return covered.mean() * np.prod(ref - low)


# ------------------------------------------------------------------ pareto_front


def test_front_two_objectives_by_hand():
    points = [(0.9, 0.1), (0.5, 0.5), (0.1, 0.9), (0.4, 0.4), (0.5, 0.2)]
    assert pareto_front(points, MAX2) == [0, 1, 2]
    # Minimising both: (0.1, 0.9), (0.4, 0.4), (0.5, 0.2), (0.9, 0.1) are the best trade-offs.
    assert pareto_front(points, MIN2) == [0, 2, 3, 4]
    # Mixed: maximise the first, minimise the second.
    assert pareto_front(points, ["maximize", "minimize"]) == [0]


def test_front_keeps_duplicates_and_drops_nan_rows():
    points = [(1.0, 1.0), (1.0, 1.0), (0.5, 0.5), (float("nan"), 9.0), (2.0, float("nan"))]
    assert pareto_front(points, MAX2) == [0, 1]


def test_front_edge_cases():
    assert pareto_front([], MAX2) == []
    assert pareto_front([(0.3, 0.3)], MAX2) == [0]
    assert pareto_front([(float("nan"), float("nan"))], MAX2) == []
    assert pareto_front([(1.0,), (3.0,), (3.0,)], ["maximize"]) == [1, 2]


def test_front_three_objectives_by_hand():
    points = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.5, 0.5, 0), (0.4, 0.4, 0), (1, 0, 0.1)]
    assert pareto_front(points, ["maximize"] * 3) == [1, 2, 3, 5]


def test_front_matches_brute_force_on_random_points():
    rng = np.random.default_rng(7)
    for dims in (2, 3, 5):
        points = np.round(rng.random((80, dims)), 1)  # rounding makes ties and duplicates
        points[rng.random(80) < 0.05, 0] = np.nan
        directions = [("maximize", "minimize")[i % 2] for i in range(dims)]
        assert pareto_front(points, directions) == brute_front(points.tolist(), directions)


def test_front_accepts_optuna_directions():
    optuna = pytest.importorskip("optuna")
    directions = [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert pareto_front([(1, 1), (2, 0), (0, 2)], directions) == [1]


def test_front_rejects_bad_input():
    with pytest.raises(ValueError, match="maximize"):
        pareto_front([(1, 2)], ["max", "min"])
    with pytest.raises(ValueError, match="one column per objective"):
        pareto_front([(1, 2, 3)], MAX2)


# ------------------------------------------------------------------- hypervolume


def test_hypervolume_two_objectives_by_hand():
    staircase = [(1, 3), (2, 2), (3, 1)]
    assert hypervolume(staircase, MIN2, (4, 4)) == pytest.approx(1 * 1 + 1 * 2 + 1 * 3)
    # The same picture, maximised from a reference at the origin.
    mirrored = [(3, 1), (2, 2), (1, 3)]
    assert hypervolume(mirrored, MAX2, (0, 0)) == pytest.approx(3 * 1 + 2 * 1 + 1 * 1)
    # A dominated point and a duplicate change nothing.
    assert hypervolume([*staircase, (3, 3), (2, 2)], MIN2, (4, 4)) == pytest.approx(6)


def test_hypervolume_three_objectives_by_hand():
    # Two boxes and their overlap: 2·1·1 + 1·2·2 − 1·1·1.
    assert hypervolume([(1, 2, 2), (2, 1, 1)], ["minimize"] * 3, (3, 3, 3)) == pytest.approx(5)
    # Three unit-thick slabs at the axes: 3·4 − 3·2 + 1 by inclusion–exclusion.
    corners = [(0, 0, 1), (0, 1, 0), (1, 0, 0)]
    assert hypervolume(corners, ["minimize"] * 3, (2, 2, 2)) == pytest.approx(7)
    # Accuracies: maximise three of them from 0.
    accuracies = [(0.5, 0.5, 0.5), (1.0, 0.25, 0.25)]
    expected = 0.125 + 0.0625 - 0.5 * 0.25 * 0.25
    assert hypervolume(accuracies, ["maximize"] * 3, (0, 0, 0)) == pytest.approx(expected)


def test_hypervolume_edge_cases():
    assert hypervolume([], MAX2, (0, 0)) == 0.0
    assert hypervolume([(0.5, 0.25)], MAX2, (0, 0)) == pytest.approx(0.125)
    # Worse than the reference, on it, or NaN: nothing.
    assert hypervolume([(-1, 0.5), (0.5, -1), (0.0, 0.5), (float("nan"), 1)], MAX2, (0, 0)) == 0
    with pytest.raises(ValueError, match="one finite value per objective"):
        hypervolume([(1, 1)], MAX2, (0,))
    with pytest.raises(ValueError, match="one finite value per objective"):
        hypervolume([(1, 1)], MAX2, (0, float("nan")))
    # One objective: the best value's distance to the reference.
    assert hypervolume([(0.2,), (0.7,)], ["maximize"], (0.1,)) == pytest.approx(0.6)


def test_hypervolume_matches_monte_carlo_in_3d():
    rng = np.random.default_rng(3)
    costs = rng.random((25, 3))
    ref = np.array([1.2, 1.1, 1.0])
    exact = hypervolume(costs, ["minimize"] * 3, ref)
    estimate = monte_carlo_hypervolume(costs, ref, 100_000, rng)
    assert exact == pytest.approx(estimate, rel=0.02)


def test_hypervolume_matches_inclusion_exclusion_in_4d():
    rng = np.random.default_rng(11)
    points = rng.random((7, 4))
    ref = np.ones(4)
    expected = 0.0  # Σ over non-empty subsets of (−1)^(|S|+1) · box(max over S)
    for size in range(1, len(points) + 1):
        for subset in itertools.combinations(points, size):
            expected += (-1) ** (size + 1) * np.prod(ref - np.max(subset, axis=0))
    assert hypervolume(points, ["minimize"] * 4, ref) == pytest.approx(expected)


def test_hypervolume_matches_optuna():
    wfg = pytest.importorskip("optuna._hypervolume")
    rng = np.random.default_rng(0)
    for dims, count in [(2, 60), (3, 120), (4, 60), (5, 40), (6, 25)]:
        for spherical in (False, True):
            points = rng.random((count, dims))
            if spherical:  # every point on the front: the hard case
                points = np.abs(rng.normal(size=(count, dims)))
                points /= np.linalg.norm(points, axis=1, keepdims=True)
            directions = [("maximize", "minimize")[i % 2] for i in range(dims)]
            signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
            ref_costs = np.full(dims, 1.1)
            ours = hypervolume(points * signs, directions, ref_costs * signs)
            assert ours == pytest.approx(wfg.compute_hypervolume(points, ref_costs), rel=1e-9)


def test_hypervolume_is_fast_enough():
    rng = np.random.default_rng(5)
    points = np.abs(rng.normal(size=(200, 3)))
    points /= np.linalg.norm(points, axis=1, keepdims=True)  # all 200 on the front
    start = time.perf_counter()
    hypervolume(points, ["maximize"] * 3, (0, 0, 0))
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------- weighted_score


def test_weighted_score():
    directions = ["maximize", "minimize", "maximize"]
    assert weighted_score([0.5, 10.0, 0.25], directions, [2.0, 0.1, 4.0]) == pytest.approx(1.0)
    assert weighted_score([np.float32(0.5)], ["maximize"], [1]) == pytest.approx(0.5)
    assert math.isnan(weighted_score([float("nan"), 1.0], MAX2, [1, 1]))
    with pytest.raises(ValueError, match="one of each per objective"):
        weighted_score([1.0, 2.0], MAX2, [1.0])


# ------------------------------------------------------------ hypervolume_history


def test_history_matches_prefix_hypervolumes():
    rng = np.random.default_rng(2)
    for dims in (2, 3, 4):
        values = rng.random((40, dims))
        values[5] = np.nan
        values[9, 0] = -1.0  # worse than the reference
        directions = ["maximize"] * dims
        ref = [0.0] * dims
        history = hypervolume_history(values, directions, ref)
        expected = [hypervolume(values[: k + 1], directions, ref) for k in range(len(values))]
        assert history == pytest.approx(expected, rel=1e-9)
        assert all(b >= a for a, b in zip(history, history[1:]))


def test_history_edge_cases():
    assert hypervolume_history([], MAX2, (0, 0)) == []
    assert hypervolume_history([(1, 1), (1, 1), (0.5, 0.5)], MAX2, (0, 0)) == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------- plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample_trials(count: int, objectives: int, seed: int = 0):
    values = np.random.default_rng(seed).random((count, objectives))
    values[1] = np.nan  # a trial whose evaluation produced NaN is drawn around, not crashed on
    trials = [(number + 100, row.tolist()) for number, row in enumerate(values)]
    front = [trials[i][0] for i in pareto_front(values, ["maximize"] * objectives)]
    return trials, front


@pytest.mark.parametrize("objectives", [1, 2, 3])
def test_plot_front_writes_png_and_self_contained_html(tmp_path, objectives):
    from evomerge.search.plot import plot_front

    trials, front = sample_trials(30, objectives)
    names = [f"task{i}/acc" for i in range(objectives)]
    written = plot_front(
        tmp_path / "plots" / "front.png",
        objective_names=names,
        trials=trials,
        front=front,
        references={"base": [0.25] * objectives, "parent <math>": [0.5] * objectives},
        title="demo & front",
    )
    png, page = written
    assert written == [tmp_path / "plots" / "front.png", tmp_path / "plots" / "front.html"]
    assert png.read_bytes().startswith(PNG_MAGIC)
    text = page.read_text(encoding="utf-8")
    assert "data:image/png;base64," in text and "demo &amp; front" in text
    assert '<table class="front">' in text and "parent &lt;math&gt;" in text
    assert all(f"<th>{name}</th>" in text for name in names)
    assert all(f"<tr><td>{number}</td>" in text for number in front)
    assert "<script" not in text and "http" not in text  # nothing runs, nothing is fetched


def test_plot_front_wants_trial_numbers(tmp_path):
    from evomerge.search.plot import plot_front

    trials, _ = sample_trials(5, 2)
    with pytest.raises(ValueError, match="not trial numbers"):
        plot_front(
            tmp_path / "f.png", objective_names=["a", "b"], trials=trials, front=[0, 1], references={}, title="t"
        )


def test_plot_search_efficiency(tmp_path):
    from evomerge.search.plot import plot_search_efficiency

    curves = {"tpe": [0.1, 0.3, 0.35, 0.5], "random": np.array([0.1, 0.2, 0.2, 0.25])}
    path = plot_search_efficiency(tmp_path / "efficiency.png", curves, ylabel="hypervolume", title="samplers")
    assert path == tmp_path / "efficiency.png"
    assert path.read_bytes().startswith(PNG_MAGIC)
