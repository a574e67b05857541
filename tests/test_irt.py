"""The IRT math: a 2PL fit recovers simulated parameters; anchors and estimators keep their invariants."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.evaluate.irt import (
    anchor_estimate,
    choose_anchors,
    choose_lambda,
    fit_2pl,
    gp_irt_estimate,
    item_embedding,
    kendall,
    p_irt_estimate,
    spearman,
)


def simulate(subjects: int, items: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(subjects, generator=generator, dtype=torch.float64)
    b = torch.randn(items, generator=generator, dtype=torch.float64)
    a = torch.exp(0.3 * torch.randn(items, generator=generator, dtype=torch.float64))
    p = torch.sigmoid(a * (theta[:, None] - b))
    return torch.bernoulli(p, generator=generator), theta, b


def test_fit_recovers_simulated_difficulty_and_ability():
    responses, theta, b = simulate(300, 80, seed=3)
    fit = fit_2pl(responses)
    assert spearman(fit.b, b) > 0.9
    assert spearman(fit.theta, theta) > 0.9
    assert torch.corrcoef(torch.stack([fit.b, b]))[0, 1] > 0.9
    assert bool((fit.a > 0).all())


def test_fit_is_deterministic_and_rejects_non_binary_responses():
    responses, _, _ = simulate(40, 20, seed=1)
    assert torch.equal(fit_2pl(responses).b, fit_2pl(responses).b)
    with pytest.raises(ValueError, match="0 or 1"):
        fit_2pl(responses * 0.5)


@pytest.mark.parametrize("cluster_on", ["irt", "responses"])
@pytest.mark.parametrize("k", [1, 7, 20])
def test_anchor_weights_sum_to_the_item_count(cluster_on, k):
    responses, _, _ = simulate(30, 50, seed=2)
    fit = fit_2pl(responses)
    anchors = choose_anchors(item_embedding(fit, responses, cluster_on), k, seed=0)
    assert 1 <= len(anchors.index) <= k
    assert float(anchors.weight.sum()) == 50
    assert len(set(anchors.index.tolist())) == len(anchors.index)
    again = choose_anchors(item_embedding(fit, responses, cluster_on), k, seed=0)
    assert torch.equal(anchors.index, again.index)


def test_repeated_items_give_fewer_anchors_not_an_error():
    responses = torch.tensor([[1.0, 1, 1, 0, 0, 0]] * 4)  # two distinct response columns
    fit = fit_2pl(responses)
    anchors = choose_anchors(item_embedding(fit, responses, "responses"), 5, seed=0)
    assert len(anchors.index) == 2
    assert anchors.weight.tolist() == [3.0, 3.0]


def test_estimators_are_exact_when_every_item_is_an_anchor():
    responses, _, _ = simulate(30, 40, seed=4)
    fit = fit_2pl(responses[:20])
    anchors = choose_anchors(item_embedding(fit, responses[:20], "irt"), 40, seed=0)
    held_out = responses[20:]
    full = held_out.mean(1)
    lam = choose_lambda(fit, responses[:20], anchors=40, cluster_on="irt", seed=0)
    assert lam == 1.0
    for estimate in (
        anchor_estimate(anchors, held_out),
        p_irt_estimate(fit, anchors, held_out),
        gp_irt_estimate(fit, anchors, held_out, 0.3),
    ):
        assert torch.allclose(estimate, full)


def test_estimators_track_held_out_scores_from_few_anchors():
    responses, _, _ = simulate(120, 100, seed=5)
    fit = fit_2pl(responses[:60])
    anchors = choose_anchors(item_embedding(fit, responses[:60], "irt"), 20, seed=0)
    held_out = responses[60:]
    lam = choose_lambda(fit, responses[:60], anchors=20, cluster_on="irt", seed=0)
    assert 0.0 <= lam <= 1.0
    estimate = gp_irt_estimate(fit, anchors, held_out[:, anchors.index], lam)
    assert spearman(estimate, held_out.mean(1)) > 0.8
    assert float((estimate - held_out.mean(1)).abs().mean()) < 0.08


def test_rank_correlations_match_hand_computed_values():
    x = torch.tensor([1.0, 2, 3, 4])
    assert spearman(x, x) == pytest.approx(1.0)
    assert kendall(x, -x) == pytest.approx(-1.0)
    # one discordant pair of six: tau = (5 - 1) / 6
    assert kendall(x, torch.tensor([1.0, 3, 2, 4])) == pytest.approx(4 / 6)
    # ties: tau-b = 5 / sqrt(6 * 5)
    assert kendall(x, torch.tensor([1.0, 1, 2, 3])) == pytest.approx(5 / math.sqrt(30))
    assert math.isnan(spearman(x, torch.ones(4)))


class AnchorRecorder:
    """An item evaluator over a fixed answer key: records which items it was asked to score."""

    def __init__(self, answers: dict[str, dict[int, float]]):
        self.answers = answers
        self.asked = []

    def item_ids(self):
        return {task: sorted(values) for task, values in self.answers.items()}

    def evaluate(self, model, items=None):
        return self.evaluate_items(model, items)[0]

    def evaluate_items(self, model, items=None):
        self.asked.append(items)
        chosen = items or self.item_ids()
        per_item = {t: {"acc,none": {d: self.answers[t][d] for d in docs}} for t, docs in chosen.items()}
        scores = {t: {"acc,none": sum(v["acc,none"].values()) / len(v["acc,none"])} for t, v in per_item.items()}
        return scores, per_item


def test_the_estimator_scores_only_anchors_and_survives_a_json_round_trip():
    import json

    from evomerge.evaluate.estimator import IrtCalibration, IrtEstimator, calibrate

    responses, _, _ = simulate(41, 30, seed=6)
    subjects = {f"m{i}": {"t": {"acc,none": dict(enumerate(row.tolist()))}} for i, row in enumerate(responses[:40])}
    calibration = calibrate(subjects, {"t": "acc,none"}, anchors=6, seed=0)
    restored = IrtCalibration.from_json(json.loads(json.dumps(calibration.to_json())))
    assert restored == calibration
    candidate = AnchorRecorder({"t": dict(enumerate(responses[40].tolist()))})
    scores = IrtEstimator(candidate, restored).evaluate(model=None)
    assert candidate.asked == [{"t": calibration.tasks["t"].anchors}]
    assert scores["t"]["acc,none"] == scores["t"]["acc,none|gp_irt"]
    assert {"acc,none|anchor", "acc,none|p_irt"} <= set(scores["t"])
    assert scores["t"]["items|evaluated"] == len(calibration.tasks["t"].anchors)
    assert 0 <= scores["t"]["acc,none"] <= 1
