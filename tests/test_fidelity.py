"""Successive halving over item budgets (eval.fidelity): the config, the nested item order, the
promotion rule, and searches run with an item-scoring fake pool (no lm-eval) plus one small real one.

The fake pool gives each (genome, doc id) a fixed 0/1 value, so a rung's scores are exact means
and a test can recompute every number the loop stored.
"""

from __future__ import annotations

import hashlib
import json
import re

import optuna
import pytest
import yaml
from test_search_loop import Outcome, Result, ScriptedPool, digest, study_and_store

from evomerge.config.space import load_space
from evomerge.errors import ConfigError
from evomerge.search import fidelity
from evomerge.search.front import compute_front, objective_values, scalarize, told_values
from evomerge.search.runner import run_search
from evomerge.search.tpe import values_by_rung
from evomerge.store.trial_store import TrialStore

ITEMS = 40  # doc ids per task in the fake pool


def item_value(params, task: str, doc: int) -> float:
    """A genome's fixed 0/1 result on one item; genomes differ in how many they get right."""
    skill = digest(params)[0] / 255
    noise = hashlib.sha256(f"{json.dumps(params, sort_keys=True)}|{task}|{doc}".encode()).digest()[0] / 255
    return float(noise < skill)


class ItemPool(ScriptedPool):
    """ScriptedPool that scores only the items it is given and returns each one's value."""

    def __init__(self, space, script=(), *, not_a_mean: bool = False):
        super().__init__(space, script)
        self.not_a_mean = not_a_mean
        self.items: list[tuple[dict, dict]] = []  # (genome, items) per search submission
        self.reference_calls: list[tuple[str, str]] = []  # score_reference's names and splits
        self.margin_calls: list[tuple[str, dict]] = []  # score_reference_margins' names and metrics

    def item_ids(self, split="search"):
        return {o.task: list(range(ITEMS)) for o in self.space.objectives}

    def submit(self, params, split="search", items=None):
        ticket = super().submit(params, split)
        self.queue[-1] = (*self.queue[-1], items)
        if split == "search":
            self.items.append((dict(params), items))
        return ticket

    def wait_any(self, timeout=None):
        ticket, params, split, items = self.queue.pop(0)
        action = self.script.pop(0) if self.script and split == "search" else "ok"
        if isinstance(action, BaseException):
            raise action
        if items is None:
            items = self.item_ids()
        per_item = {t: {"acc,none": {d: item_value(params, t, d) for d in ids}} for t, ids in items.items()}
        scores = {
            t: {"acc,none": sum(values["acc,none"].values()) / len(values["acc,none"])}
            for t, values in per_item.items()
        }
        if self.not_a_mean:
            scores = {t: {"acc,none": 0.5 * m["acc,none"] + 0.25} for t, m in scores.items()}
        return Outcome(ticket, result=Result(scores, digest(params).hex(), item_scores=per_item))

    def score_reference(self, name, split):
        self.reference_calls.append((name, split))
        return super().score_reference(name, split)

    def score_reference_margins(self, name, split, metrics):
        """The reference's scores and a fixed margin per item, drawn from its name (order: margin)."""
        self.margin_calls.append((name, dict(metrics)))
        ids = self.item_ids()
        return self.scores({"reference": name}, split), {t: {d: margin(name, t, d) for d in ids[t]} for t in metrics}

    def scores(self, params, split):
        ids = self.item_ids()
        tasks = [o.task if split == "search" else o.selection_task for o in self.space.objectives]
        return {
            t: {"acc,none": sum(item_value(params, o.task, d) for d in ids[o.task]) / ITEMS}
            for t, o in zip(tasks, self.space.objectives)
        }


def margin(name: str, task: str, doc: int) -> float:
    """A reference's fixed answer margin on one item, in [-4, 4]."""
    return hashlib.sha256(f"margin|{name}|{task}|{doc}".encode()).digest()[0] / 32 - 4


def full_means(space, params) -> list[float]:
    return [sum(item_value(params, o.task, d) for d in range(ITEMS)) / ITEMS for o in space.objectives]


def fidelity_space(tmp_path, demo_family, *, fidelity=None, objectives=None, **search):
    from test_search_e2e import write_space

    path = write_space(tmp_path, demo_family, **{"sampler": "random", "enqueue": [], "finalists": 0, **search})
    data = yaml.safe_load(path.read_text())
    data["eval"]["fidelity"] = fidelity or {"rungs": [5, 15, "all"], "eta": 3}
    if objectives is not None:
        data["objectives"] = data["objectives"][:objectives]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_space(path)


# -- the config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rungs", "expected"),
    [([25, 100, "all"], [25, 100, "all"]), ([0.1, 0.5], [0.1, 0.5, "all"]), (["10", "ALL"], [10, "all"])],
)
def test_rungs_are_read_with_the_full_budget_last(tmp_path, demo_family, rungs, expected):
    space = fidelity_space(tmp_path, demo_family, fidelity={"rungs": rungs})
    assert space.eval.fidelity.rungs == expected and space.eval.fidelity.eta == 3


@pytest.mark.parametrize(
    ("fidelity", "message"),
    [
        ({"rungs": [100, 25]}, "rungs must grow strictly"),
        ({"rungs": [10, 0.5]}, "not both"),
        ({"rungs": ["all", 10]}, "can only be the last"),
        ({"rungs": ["all"]}, "at least one budget below"),
        ({"rungs": [0]}, "a rung is a whole number"),
        ({"rungs": [10], "eta": 1}, "greater than 1"),
        ({"rungs": [10], "etaa": 2}, "etaa"),
        ({"rungs": [10], "promote_by": "mean"}, "promote_by"),
        ({"rungs": [10], "order": "hardest"}, "order"),
    ],
)
def test_bad_fidelity_settings_are_one_line_errors(tmp_path, demo_family, fidelity, message):
    with pytest.raises(ConfigError) as caught:
        fidelity_space(tmp_path, demo_family, fidelity=fidelity)
    assert message in str(caught.value) and "eval.fidelity" in str(caught.value) and "\n" not in str(caught.value)


def test_cap_needs_metrics_with_a_best_value_per_item(tmp_path, demo_family):
    path = tmp_path / "space.yml"
    fidelity_space(tmp_path, demo_family, fidelity={"rungs": [5], "cap": True})  # acc,none: fine
    data = yaml.safe_load(path.read_text())
    data["objectives"][1]["metric"] = "f1,none"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load_space(path)
    message = str(caught.value)
    assert "eval.fidelity.cap" in message and f"objective '{data['objectives'][1]['name']}'" in message
    assert "acc_norm" in message and "\n" not in message


def test_fidelity_and_the_estimator_are_one_or_the_other(tmp_path, demo_family):
    path = tmp_path / "space.yml"
    fidelity_space(tmp_path, demo_family)
    data = yaml.safe_load(path.read_text())
    data["eval"]["estimator"] = {"kind": "irt", "anchors": 5, "calibration": 2}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match="set eval.fidelity or eval.estimator, not both") as caught:
        load_space(path)
    assert "\n" not in str(caught.value)


# -- the items of each rung -----------------------------------------------------------------


def test_the_item_order_is_a_seeded_permutation_and_the_rungs_nest():
    ids = {"a": list(range(100)), "b": list(range(7, 47))}
    order = fidelity.draw_item_order(ids, seed=3)
    assert order == fidelity.draw_item_order(ids, seed=3)
    assert order != fidelity.draw_item_order(ids, seed=4)
    assert order["a"] == fidelity.draw_item_order({"a": ids["a"]}, seed=3)["a"]  # per task: others don't matter
    assert sorted(order["a"]) == ids["a"] and sorted(order["b"]) == ids["b"] and order["a"] != ids["a"]

    spec = type("Spec", (), {"rungs": [25, 0.9, "all"], "cap": False})  # only .rungs and .cap are read
    ladder = fidelity.RungLadder.build(spec, order)
    assert ladder.sizes == [{"a": 25, "b": 25}, {"a": 90, "b": 36}, {"a": 100, "b": 40}]
    seen = {"a": [], "b": []}
    for rung in range(3):
        for task, new in ladder.new_items(rung).items():
            seen[task] += new
            assert seen[task] == order[task][: ladder.sizes[rung][task]]  # a prefix of the one order
    assert ladder.items(0) == 50 and ladder.items(2) == 140


def test_the_margin_order_puts_the_smallest_margins_first_and_ties_keep_the_seeded_order():
    ids = {"a": list(range(30)), "b": list(range(20)), "c": list(range(10))}
    margins = {
        "a": {d: (d % 3) - 1.0 for d in range(30)},  # sizes 1, 0, 1: the ten zeros first
        "b": {d: 0.0 for d in range(19)},  # one id without a margin: the task keeps its random order
    }
    random, by_margin = fidelity.draw_item_order(ids, 5), fidelity.draw_item_order(ids, 5, margins)
    assert by_margin["a"][:10] == [d for d in random["a"] if d % 3 == 1]  # ties in the seeded order
    assert by_margin["a"][10:] == [d for d in random["a"] if d % 3 != 1]
    assert by_margin["b"] == random["b"] and by_margin["c"] == random["c"]
    assert fidelity.draw_item_order(ids, 5, {}) == random


def test_the_expert_of_a_task_is_the_reference_that_scores_it_best(tmp_path, demo_family):
    space = fidelity_space(tmp_path, demo_family, objectives=2)
    first, second = (o.task for o in space.objectives)
    references = {
        "base": {first: {"acc,none": 0.2}, second: {"acc,none": 0.6}},
        "x": {first: {"acc,none": 0.9}, second: {"acc,none": float("nan")}},
        "y": {first: {"acc,none": 0.9}, second: {"acc,none": 0.5}},  # a tie: the first name wins
    }
    assert fidelity.experts(space, references) == {first: "x", second: "base"}


def test_race_stops_a_trial_the_best_full_trial_beats_on_the_same_items(tmp_path, demo_family):
    single = fidelity_space(tmp_path, demo_family, objectives=1, fidelity={"rungs": [5, 15], "race": True})
    # trial 0 and 1 are scored in full; trial 1 is the best there (0.9), and scored 0.6 at rung 0
    reached = {0: {0: [0.8], 1: [0.6], 2: [0.9]}, 1: {0: [0.7], 1: [0.6]}, 2: {0: [0.5], 1: [0.9]}}
    behind = fidelity.behind_the_best
    assert behind(single, [0.59], reached, 0, 2) and not behind(single, [0.6], reached, 0, 2)  # a tie goes up
    assert not behind(single, [0.61], reached, 0, 2)  # trial 0's 0.8 at rung 0 does not count: it is not the best
    assert behind(single, [0.55], reached, 1, 2) and not behind(single, [0.6], reached, 1, 2)
    assert not behind(single, [0.0], {0: {0: [0.9]}}, 0, 2)  # nothing scored in full yet

    pareto = fidelity_space(tmp_path, demo_family, objectives=2, fidelity={"rungs": [5, 15], "race": True})
    # full values: trial 0 (0.9, 0.1) and 1 (0.1, 0.9) are both on the front, trial 2 is dominated
    reached = {0: {0: [0.6, 0.2], 1: [0.2, 0.6], 2: [0.9, 0.9]}, 2: {0: [0.9, 0.1], 1: [0.1, 0.9], 2: [0.05, 0.05]}}
    assert behind(pareto, [0.5, 0.1], reached, 0, 2)  # trial 0 dominates it at rung 0
    assert not behind(pareto, [0.6, 0.2], reached, 0, 2)  # equal is not dominated
    assert not behind(pareto, [0.5, 0.3], reached, 0, 2)  # neither front member dominates it
    weighted = fidelity_space(
        tmp_path, demo_family, objectives=2, fidelity={"rungs": [5, 15], "race": True, "promote_by": "weighted"}
    )
    # the best by the weighted sum: trial 0 (ties with trial 1 at 1.0; the earlier wins), 0.8 at rung 0
    assert behind(weighted, [0.5, 0.2], reached, 0, 2) and not behind(weighted, [0.5, 0.3], reached, 0, 2)


def test_cap_stops_a_trial_only_once_the_best_full_trial_is_out_of_its_reach(tmp_path, demo_family):
    single = fidelity_space(tmp_path, demo_family, objectives=1, fidelity={"rungs": [5, 15], "cap": True})
    task = single.objectives[0].task
    reach = fidelity.out_of_reach

    def scored(right: int, of: int) -> dict:
        return {task: {"acc,none": {d: float(d < right) for d in range(of)}}}

    full = {0: [0.8], 1: [0.9]}  # the best scored 36 of 40 right
    assert reach(single, scored(0, 5), {task: 40}, full)  # 35 left: 35/40 at most
    assert not reach(single, scored(1, 5), {task: 40}, full)  # 36/40 at most: a tie is within reach
    assert reach(single, scored(25, 30), {task: 40}, full) and not reach(single, scored(26, 30), {task: 40}, full)
    assert not reach(single, scored(0, 5), {task: 40}, {})  # nothing scored in full yet

    two = fidelity_space(tmp_path, demo_family, objectives=2, fidelity={"rungs": [5, 15], "cap": True})
    first, second = (o.task for o in two.objectives)

    def both(right: tuple[int, int], of: int) -> dict:
        return {t: {"acc,none": {d: float(d < r) for d in range(of)}} for t, r in zip((first, second), right)}

    totals = {first: 10, second: 10}
    front = {0: [1.0, 0.5], 1: [0.5, 1.0]}  # both on the front
    assert reach(two, both((4, 0), 5), totals, front)  # at most (0.9, 0.5): trial 0 dominates it
    assert not reach(two, both((5, 0), 5), totals, front)  # (1.0, 0.5) at most: equal is not dominated
    assert not reach(two, both((4, 1), 5), totals, front)  # (0.9, 0.6) at most: nobody dominates it
    weighted = fidelity_space(
        tmp_path, demo_family, objectives=2, fidelity={"rungs": [5, 15], "cap": True, "promote_by": "weighted"}
    )
    assert reach(weighted, both((4, 0), 5), totals, front)  # 1.4 at most, against the best's 1.5
    assert not reach(weighted, both((3, 2), 5), totals, front)  # 1.5 at most: a tie


def test_cap_scores_the_top_rung_in_steps_as_large_as_the_rung_below():
    spec = type("Spec", (), {"rungs": [5, 15, "all"], "cap": True})
    ladder = fidelity.RungLadder.build(spec, {"a": list(range(40)), "b": list(range(100, 120))})
    assert ladder.steps == [{"a": 30, "b": 20}]  # b has 20 items: it ends in the first step
    assert ladder.step_items(0) == {"a": list(range(15, 30)), "b": list(range(115, 120))}
    assert ladder.step_items(1) == {"a": list(range(30, 40)), "b": []}
    assert [ladder.step_total(k) for k in range(2)] == [50, 60]
    plain = fidelity.RungLadder.build(type("Spec", (), {"rungs": [5, 15, "all"], "cap": False}), ladder.order)
    assert plain.steps == [] and plain.step_items(0) == plain.new_items(2) and plain.step_total(0) == 60


def test_a_rung_that_adds_no_item_is_refused():
    spec = type("Spec", (), {"rungs": [50, 80, "all"], "cap": False})
    with pytest.raises(ConfigError, match="rung 1 .* adds no item"):
        fidelity.RungLadder.build(spec, {"a": list(range(40))})


# -- the promotion rule ---------------------------------------------------------------------


def test_promotion_keeps_the_top_one_over_eta(tmp_path, demo_family):
    single = fidelity_space(tmp_path, demo_family, objectives=1)
    promoted = fidelity.promoted
    assert promoted(single, [0.1], [], eta=3)  # the first trial at a rung goes up
    assert not promoted(single, [0.1], [[0.2]], eta=3)  # 2 trials: keep 1, the better
    assert promoted(single, [0.3], [[0.2], [0.1]], eta=3)
    rivals = [[v] for v in (0.9, 0.8, 0.7, 0.6, 0.5)]  # 6 trials: keep 2
    assert promoted(single, [0.85], rivals, eta=3) and not promoted(single, [0.75], rivals, eta=3)
    assert promoted(single, [0.75], rivals, eta=2)  # keep 3
    assert not promoted(single, [0.8], rivals, eta=3)  # a tie with the 2nd: the earlier trial keeps the place
    assert promoted(single, [0.8], rivals, eta=2)
    assert not promoted(single, [0.1], [[0.1]], eta=3)  # the same score as the only rival


def test_multi_objective_promotion_goes_by_non_domination_rank_then_weighted_sum(tmp_path, demo_family):
    space = fidelity_space(tmp_path, demo_family, objectives=2, sampler="tpe")
    assert space.multi_objective
    rivals = [[1.0, 0.0], [0.0, 1.0], [0.2, 0.2], [0.1, 0.1], [0.05, 0.05]]  # 6 trials: keep 2
    # [0.5, 0.6] is on the front with both corners (rank 0) and has the largest sum there: none ahead
    assert fidelity.promoted(space, [0.5, 0.6], rivals, eta=3)
    # [0.3, 0.3] is on the front too, but both corners have the larger sum (1.0 > 0.6): 2 ahead
    assert not fidelity.promoted(space, [0.3, 0.3], rivals, eta=3)
    # rank before sum: [0.55, 0.55] sums to more than the corners, but [0.6, 0.6] dominates it
    rivals = [[0.6, 0.6], [1.0, 0.0], [0.0, 1.0], [0.1, 0.1], [0.1, 0.1]]
    assert not fidelity.promoted(space, [0.55, 0.55], rivals, eta=3)
    assert fidelity.promoted(space, [0.55, 0.55], rivals, eta=1.5)  # keep 4: 3 ahead
    by_sum = fidelity_space(
        tmp_path, demo_family, objectives=2, sampler="tpe", fidelity={"rungs": [5], "promote_by": "weighted"}
    )
    assert fidelity.promoted(by_sum, [0.55, 0.55], rivals, eta=3)  # only [0.6, 0.6] has a larger sum
    # [0.2, 0.2] is dominated by [0.3, 0.3]: rank 1, whatever its sum
    keys = fidelity.sort_keys(space, [[0.3, 0.3], [0.2, 0.2], [0.9, 0.0]])
    assert [k[0] for k in keys] == [0, 1, 0]


# -- searches with the fake pool ------------------------------------------------------------


@pytest.mark.parametrize("objectives", [1, 4])
def test_a_halving_search_prunes_scores_only_new_items_and_fronts_only_full_trials(tmp_path, demo_family, objectives):
    space = fidelity_space(tmp_path, demo_family, n_trials=12, objectives=objectives)
    seen = []
    pool = ItemPool(space)
    summary = run_search(space, pool=pool, progress=False, on_trial=seen.append)
    study, records = study_and_store_pruned(space)
    store = TrialStore(space.storage_url)
    states = {t.number: t.state.name for t in study.trials}
    assert len(states) == 12 and set(states.values()) <= {"COMPLETE", "PRUNED"}
    pruned = [n for n, s in states.items() if s == "PRUNED"]
    complete = [n for n, s in states.items() if s == "COMPLETE"]
    assert pruned and complete and summary.n_pruned == len(pruned) and summary.n_complete == len(complete)

    # the stored order is what every submission used: rung k adds order[n_(k-1):n_k]
    order = store.item_order(space.study_name)
    assert order == fidelity.draw_item_order(pool.item_ids(), space.search.seed)
    by_genome: dict[str, list[dict]] = {}
    for params, items in pool.items:
        by_genome.setdefault(json.dumps(params, sort_keys=True), []).append(items)
    bounds = [0, 5, 15, ITEMS]
    for submissions in by_genome.values():
        for rung, items in enumerate(submissions):
            assert items == {t: ids[bounds[rung] : bounds[rung + 1]] for t, ids in order.items()}

    rungs = store.rungs(space.study_name)
    for number in pruned:
        top = max(rungs[number])
        assert top < 2 and records[number].values == rungs[number][top][1]
        assert study.trials[number].user_attrs["rung"].startswith(f"rung {top}/2")
    for number, by_rung in rungs.items():  # what TPE's rung model reads (search/tpe.py)
        told = {rung: told_values(space, values) for rung, (_, values) in by_rung.items()}
        assert values_by_rung(study.trials[number]) == told
    full_scores = store.scores(space.study_name, "search")
    for number in complete:
        assert sorted(rungs[number]) == [0, 1, 2] and rungs[number][2][0] == ITEMS * objectives
        genome = records[number].genome
        expected = full_means(space, genome)
        assert objective_values(space, full_scores[number]) == pytest.approx(expected)  # the union's mean, exact
    assert {row.number for row in summary.front} <= set(complete)
    assert summary.best.number in complete
    assert {e["number"] for e in seen if e["pruned"]} == set(pruned)

    # each promotion followed the rule against what the rung held when the trial arrived
    for rung in (0, 1):
        arrived = sorted(n for n in rungs if rung in rungs[n])  # one worker: trials climb one after another
        for i, number in enumerate(arrived):
            rivals = [rungs[m][rung][1] for m in arrived[:i]]
            assert fidelity.promoted(space, rungs[number][rung][1], rivals, 3) == (rung + 1 in rungs[number])


def test_pruned_trials_never_make_the_front_even_with_better_low_rung_scores(tmp_path, demo_family):
    space = fidelity_space(tmp_path, demo_family, n_trials=3, objectives=1)
    run_search(space, pool=ItemPool(space), progress=False)
    store = TrialStore(space.storage_url)
    store.prune_trial(
        space.study_name,
        99,
        values=[1.0],
        plan_yaml="",
        merge_seconds=0,
        eval_seconds=0,
        device="cpu",
        weights_hash="x",
    )
    store.record_scores(space.study_name, 99, "search", {o.task: {o.metric: 1.0} for o in space.objectives})
    front = compute_front(space, store)
    assert front and 99 not in {row.number for row in front}
    assert all(scalarize(space, row.search) < 1.0 for row in front)


def test_a_metric_that_is_not_a_mean_is_refused(tmp_path, demo_family):
    space = fidelity_space(tmp_path, demo_family, n_trials=2, objectives=1)
    with pytest.raises(fidelity.FidelityError, match="not a mean over items"):
        run_search(space, pool=ItemPool(space, not_a_mean=True), progress=False)
    study, records = study_and_store(space)
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]  # failed and queued again


def test_an_interrupted_halving_search_resumes_with_the_same_order_and_rungs(tmp_path, demo_family):
    space = fidelity_space(tmp_path, demo_family, n_trials=8, objectives=2, sampler="tpe")
    with pytest.raises(KeyboardInterrupt):
        run_search(space, pool=ItemPool(space, ["ok"] * 7 + [KeyboardInterrupt()]), progress=False)
    store = TrialStore(space.storage_url)
    order, before = store.item_order(space.study_name), store.rungs(space.study_name)
    study = optuna.load_study(study_name=space.study_name, storage=space.storage_url)
    interrupted = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(interrupted) == 1 and study.trials[-1].user_attrs["retry_of"] == interrupted[0].number

    pool = ItemPool(space)
    summary = run_search(space, pool=pool, progress=False)
    assert store.item_order(space.study_name) == order
    after = store.rungs(space.study_name)
    assert all(after[n] == rungs for n, rungs in before.items())  # stored rung scores kept
    retry = study.trials[-1].number
    assert pool.items[0][0] == dict(interrupted[0].params) and set(after[retry]) >= {0}  # re-runs from rung 0
    assert summary.n_complete + summary.n_pruned == 8 and summary.n_failed == 1
    study_and_store_pruned(space)


def test_the_margin_order_comes_from_each_tasks_expert_in_the_pass_that_scores_the_references(tmp_path, demo_family):
    fidelity_spec = {"rungs": [5, 15, "all"], "eta": 3, "order": "margin"}
    space = fidelity_space(tmp_path, demo_family, n_trials=6, objectives=4, fidelity=fidelity_spec)
    pool = ItemPool(space)
    run_search(space, pool=pool, progress=False)
    store = TrialStore(space.storage_url)
    names = [space.base_model.name, *(m.name for m in space.models)]
    metrics = {o.task: o.metric for o in space.objectives}
    assert pool.margin_calls == [(name, metrics) for name in names]
    assert [split for _, split in pool.reference_calls] == ["selection"] * len(names)  # no second search pass
    experts = fidelity.experts(space, store.references(space.study_name, "search"))
    ids = pool.item_ids()
    expected = fidelity.draw_item_order(
        ids, space.search.seed, {t: {d: margin(experts[t], t, d) for d in ids[t]} for t in ids}
    )
    order = store.item_order(space.study_name)
    assert order == expected and order != fidelity.draw_item_order(ids, space.search.seed)
    for task, docs in order.items():
        sizes = [abs(margin(experts[task], task, d)) for d in docs]
        assert sizes == sorted(sizes)
    assert pool.items[0][1] == {t: docs[:5] for t, docs in order.items()}  # rung 0 scores the smallest margins

    # Interrupted after the references were scored, before the order was stored: the next run
    # asks only the experts for their margins, once each.
    other = fidelity_space(tmp_path, demo_family, n_trials=2, objectives=4, fidelity=fidelity_spec, study_name="again")

    class NoItems(ItemPool):
        def item_ids(self, split=None):  # the loop names the split; the fake's own scoring does not
            if split is not None:
                raise KeyboardInterrupt
            return super().item_ids()

    with pytest.raises(KeyboardInterrupt):
        run_search(other, pool=NoItems(other), progress=False)
    again = TrialStore(other.storage_url)
    assert not again.item_order("again") and len(again.references("again", "search")) == len(names)
    pool = ItemPool(other)
    run_search(other, pool=pool, progress=False)
    assert "search" not in {split for _, split in pool.reference_calls}
    assert fidelity.experts(other, again.references("again", "search")) == experts
    assert sorted(name for name, _ in pool.margin_calls) == sorted(set(experts.values()))
    assert again.item_order("again") == fidelity.draw_item_order(
        ids, other.search.seed, {t: {d: margin(experts[t], t, d) for d in ids[t]} for t in ids}
    )


@pytest.mark.parametrize("objectives", [1, 4])
def test_a_racing_search_promotes_only_what_the_best_full_trial_does_not_beat(
    tmp_path, demo_family, objectives, monkeypatch
):
    spec = {"rungs": [5, 15, "all"], "eta": 2, "race": True}
    space = fidelity_space(tmp_path, demo_family, n_trials=16, objectives=objectives, fidelity=spec, sampler="tpe")
    calls = []
    real = fidelity.behind_the_best

    def recording(space, values, reached, rung, top):
        outcome = real(space, values, reached, rung, top)
        calls.append((rung, len(reached.get(top, {})), outcome))
        return outcome

    monkeypatch.setattr(fidelity, "behind_the_best", recording)
    promotions = []
    real_promoted = fidelity.promoted
    monkeypatch.setattr(fidelity, "promoted", lambda *args: promotions.append(real_promoted(*args)) or promotions[-1])
    summary = run_search(space, pool=ItemPool(space), progress=False)
    rungs = TrialStore(space.storage_url).rungs(space.study_name)
    at = [sum(1 for r in rungs.values() if k in r) for k in range(3)]
    assert {rung for rung, _, _ in calls} == {1}  # only the last rung below the full budget races
    assert len(calls) == sum(promotions) - at[1]  # every trial the eta rule sends to the full budget is asked
    assert at[2] == sum(1 for _, _, behind in calls if not behind)  # full: promoted and not behind the best
    assert any(behind for _, _, behind in calls) and all(full or not behind for _, full, behind in calls)
    assert summary.n_complete >= 1 and summary.n_complete + summary.n_pruned == 16


@pytest.mark.parametrize(("objectives", "promote_by"), [(1, "pareto"), (4, "pareto"), (4, "weighted")])
def test_a_capping_search_stops_only_trials_that_could_not_have_caught_the_best(
    tmp_path, demo_family, objectives, promote_by
):
    spec = {"rungs": [5, 15, "all"], "eta": 1.5, "cap": True, "promote_by": promote_by}
    space = fidelity_space(tmp_path, demo_family, n_trials=24, objectives=objectives, fidelity=spec, sampler="tpe")
    pool = ItemPool(space)
    summary = run_search(space, pool=pool, progress=False)
    study = optuna.load_study(study_name=space.study_name, storage=space.storage_url)

    def full_values(params) -> list[float]:  # what the trial scores on every item (the fake is deterministic)
        return [sum(item_value(params, o.task, d) for d in range(ITEMS)) / ITEMS for o in space.objectives]

    def ahead(rival, values) -> bool:
        return fidelity._ahead(space, rival, values)

    complete = {t.number: full_values(t.params) for t in study.trials if t.state.name == "COMPLETE"}
    capped = [t for t in study.trials if "capped after" in t.user_attrs.get("rung", "")]
    assert capped, "no trial was capped: the test shows nothing"
    for trial in capped:  # exact: a trial scored in full before it beats it on every item
        earlier = [values for number, values in complete.items() if number < trial.number]
        assert any(ahead(rival, full_values(trial.params)) for rival in earlier), trial.number
    scored = {}
    for params, items in pool.items:
        key = json.dumps(params, sort_keys=True)
        scored.setdefault(key, []).append(sum(len(ids) for ids in items.values()))
    per_task = len(space.objectives)
    for trial in study.trials:
        sizes = scored[json.dumps(trial.params, sort_keys=True)]
        assert sizes == [5 * per_task, 10 * per_task, 15 * per_task, 10 * per_task][: len(sizes)]  # steps of 15
        if trial.number in complete:
            assert len(sizes) == 4
    assert any(len(scored[json.dumps(t.params, sort_keys=True)]) == 3 for t in capped)  # stopped inside the top rung
    assert summary.n_complete + summary.n_pruned == 24
    store = TrialStore(space.storage_url)
    labelled = {
        t.number: tuple(int(n) for n in re.search(r"capped after (\d+) of (\d+) items", t.user_attrs["rung"]).groups())
        for t in capped
    }
    assert store.capped(space.study_name) == labelled  # the store keeps what the dashboard label says
    lines = fidelity.rung_summary(store, space)
    assert "capping" in lines[0]
    capped_line = next(line for line in lines if line.startswith("Capped, the best out of reach:"))
    assert all(f"{n} after {scored} of {full} items" in capped_line for n, (scored, full) in labelled.items())
    stopped = [int(n) for line in lines if line.startswith("Stopped at rung") for n in re.findall(r"(\d+)[,.]", line)]
    assert stopped and not set(stopped) & set(labelled)  # a capped trial is listed once, as capped
    for rung, went_up in re.findall(r"rung (\d), \d+ items: \d+ trials, (\d+) went up", lines[0]):
        # up from rung k: scored past it (a trial capped inside the top rung went up to it)
        assert int(went_up) == sum(
            len(scored[json.dumps(t.params, sort_keys=True)]) > int(rung) + 1 for t in study.trials
        )


def test_a_task_without_margins_keeps_the_random_order_and_the_study_says_so(tmp_path, demo_family):
    fidelity_spec = {"rungs": [5, 15, "all"], "eta": 3, "order": "margin"}
    space = fidelity_space(tmp_path, demo_family, n_trials=2, objectives=2, fidelity=fidelity_spec)
    first, second = (o.task for o in space.objectives)

    class FirstOnly(ItemPool):  # as if the second task were generation: no margins
        def score_reference_margins(self, name, split, metrics):
            scores, margins = super().score_reference_margins(name, split, metrics)
            return scores, {first: margins[first]}

    summary = run_search(space, pool=FirstOnly(space), progress=False)
    order = TrialStore(space.storage_url).item_order(space.study_name)
    random = fidelity.draw_item_order({first: list(range(ITEMS)), second: list(range(ITEMS))}, space.search.seed)
    assert order[second] == random[second] and order[first] != random[first]
    assert any(f"{second} gave no answer margins" in note and "random order" in note for note in summary.notes)


def test_validate_says_which_tasks_the_margin_order_cannot_sort(tmp_path, demo_family, tasks_dir):
    from test_request_cache import _TASKS

    from evomerge.evaluate.harness_checks import check_tasks

    docs = (tasks_dir / "data" / "sort_search.jsonl").read_text().splitlines()[:4]
    (tmp_path / "data.jsonl").write_text("\n".join(docs) + "\n")
    (tmp_path / "tiny_generate.yaml").write_text(_TASKS["tiny_generate"].lstrip())
    space = fidelity_space(tmp_path, demo_family, objectives=1, fidelity={"rungs": [2], "order": "margin"})
    assert "margin" not in check_tasks(space, None)  # demo_* are multiple choice
    path = tmp_path / "space.yml"
    data = yaml.safe_load(path.read_text())
    data["eval"]["include_paths"].append(str(tmp_path))
    data["objectives"].append({"task": "tiny_generate", "metric": "exact_match,none"})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    line = check_tasks(load_space(path), None)
    assert "eval.fidelity.order margin: tiny_generate not multiple choice" in line and "random order" in line


def study_and_store_pruned(space):
    """Optuna and the store agree on every trial's state (pruned included)."""
    study = optuna.load_study(study_name=space.study_name, storage=space.storage_url)
    records = {r.number: r for r in TrialStore(space.storage_url).trials(space.study_name)}
    names = {"COMPLETE": "complete", "FAIL": "failed", "PRUNED": "pruned"}
    started = [t for t in study.trials if t.state.name != "WAITING"]
    assert {t.number: names[t.state.name] for t in started} == {n: r.status for n, r in records.items()}
    return study, records


# -- the real thing: lm-eval on the demo family -----------------------------------------------


@pytest.mark.slow
def test_the_demo_fidelity_space_runs_as_written(tmp_path, demo_family, capsys):
    """search_spaces/demo_fidelity.yml in a copy of the repository layout (fewer items and trials):
    the first parent climbs every rung, and its full-budget scores, put together from three rungs
    of per-item values, equal lm-eval's own scores of that parent on every item."""
    from pathlib import Path

    from test_search_e2e import run_cli

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "demo_models").symlink_to(demo_family.root)
    (tmp_path / "tasks").symlink_to(repo / "tasks")
    data = yaml.safe_load((repo / "search_spaces" / "demo_fidelity.yml").read_text())
    data["device"] = "cpu"
    data["eval"]["limit"], data["eval"]["selection_limit"] = 40, 5  # rungs 10, 30, 40 items per task
    data["search"].update({"n_trials": 6, "finalists": 1})
    path = tmp_path / "search_spaces" / "demo_fidelity.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))

    assert run_cli(["run", str(path), "-q"]) == 0
    space = load_space(path)
    store = TrialStore(space.storage_url)
    records = store.trials(space.study_name)
    assert len(records) == 6 and {r.status for r in records} <= {"complete", "pruned"}
    rungs = store.rungs(space.study_name)
    assert sorted(rungs[0]) == [0, 1, 2] and [rungs[0][k][0] for k in range(3)] == [40, 120, 160]
    parent = store.references(space.study_name, "search")[space.models[0].name]  # trial 0 is that parent alone
    trial0 = store.scores(space.study_name, "search")[0]
    for objective in space.objectives:
        assert trial0[objective.task][objective.metric] == pytest.approx(parent[objective.task][objective.metric])
    front = {row.number for row in compute_front(space, store)}
    assert front and front <= {r.number for r in records if r.status == "complete"}

    capsys.readouterr()
    assert run_cli(["front", str(path), "--top", "0"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "Successive halving (eta 3, items by margin, racing the best, capping): rung 0, 40 items: 6 trials" in out
    pruned = sorted(r.number for r in records if r.status == "pruned")
    if pruned:
        assert "Stopped at rung" in out and all(f"{n}" in out for n in pruned)


@pytest.mark.parametrize(("sampler", "objectives"), [("tpe", 4), ("tpe", 1), ("nsga2", 2), ("cmaes", 2)])
def test_every_sampler_runs_past_its_startup_with_pruned_trials(tmp_path, demo_family, sampler, objectives):
    """The samplers read a study holding PRUNED trials (told without values) past their random start."""
    options = {"population_size": 4} if sampler == "nsga2" else {"n_startup_trials": 4} if sampler == "tpe" else {}
    space = fidelity_space(
        tmp_path, demo_family, n_trials=14, objectives=objectives, sampler=sampler, sampler_options=options
    )
    summary = run_search(space, pool=ItemPool(space), progress=False)
    assert summary.n_pruned and summary.n_complete + summary.n_pruned == 14 and summary.n_failed == 0
    study_and_store_pruned(space)


def test_a_resumed_study_keeps_its_rungs(tmp_path, demo_family):
    space = fidelity_space(tmp_path, demo_family, n_trials=3, objectives=1)
    run_search(space, pool=ItemPool(space), progress=False)
    changed = fidelity_space(tmp_path, demo_family, n_trials=4, objectives=1, fidelity={"rungs": [8, 15, "all"]})
    with pytest.raises(ConfigError, match="scored trial 0 at rung 0 on 5 items, these rungs give 8"):
        run_search(changed, pool=ItemPool(changed), progress=False)


# -- optuna's pruners deciding a single-objective study ---------------------------------------


@pytest.mark.parametrize(
    ("objectives", "fidelity", "message"),
    [
        (4, {"rungs": [5, 15], "pruner": "successive_halving"}, "takes a single-objective study"),
        (1, {"rungs": [5, 15], "pruner": "hyperband", "promote_by": "weighted"}, "promote_by is evomerge's rule"),
        (1, {"rungs": [5, 15], "pruner": "hyperband", "p_threshold": 0.2}, "the wilcoxon pruner's"),
        (1, {"rungs": [5, 15], "pruner": "median"}, "pruner"),
        (1, {"rungs": [5, 15], "pruner": "hyperband", "race": True}, "race is evomerge's rule"),
        (1, {"rungs": [5, 15], "pruner": "wilcoxon", "cap": True}, "cap is evomerge's rule"),
        (1, {"rungs": [5, 15], "pruner": "successive_halving", "eta": 2.5}, "takes a whole number"),
    ],
)
def test_a_pruner_the_study_cannot_use_is_a_one_line_error(tmp_path, demo_family, objectives, fidelity, message):
    with pytest.raises(ConfigError) as caught:
        fidelity_space(tmp_path, demo_family, fidelity=fidelity, objectives=objectives, sampler="tpe")
    assert message in str(caught.value) and "eval.fidelity" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("pruner", "objectives", "sampler"),
    [("successive_halving", 1, "tpe"), ("hyperband", 1, "tpe"), ("successive_halving", 2, "cmaes")],
)
def test_optunas_pruner_decides_each_rung_from_the_reported_values(tmp_path, demo_family, pruner, objectives, sampler):
    space = fidelity_space(
        tmp_path,
        demo_family,
        n_trials=14,
        objectives=objectives,
        sampler=sampler,
        fidelity={"rungs": [5, 15, "all"], "eta": 3, "pruner": pruner},
    )
    summary = run_search(space, pool=ItemPool(space), progress=False)
    study, records = study_and_store_pruned(space)
    assert summary.n_pruned and summary.n_complete and summary.n_failed == 0
    rungs = TrialStore(space.storage_url).rungs(space.study_name)
    steps = [objectives * n for n in (5, 15, ITEMS)]  # every task's items together
    for trial in study.trials:
        reached = rungs[trial.number]
        # the study's value at each rung it reached, at step = the items scored so far
        assert trial.intermediate_values == {
            steps[k]: pytest.approx(scalarize(space, values)) for k, (_, values) in reached.items()
        }
        if trial.state.name == "PRUNED":
            assert max(reached) < 2
        # the pruner kept its own books on every trial it judged below the top
        assert any(key.startswith(("completed_rung_", "hyperband")) for key in trial.system_attrs) or max(reached) == 2
    assert {row.number for row in summary.front} <= {n for n, r in records.items() if r.status == "complete"}


def test_the_wilcoxon_pruner_is_told_every_item_in_the_study_order(tmp_path, demo_family):
    space = fidelity_space(
        tmp_path,
        demo_family,
        n_trials=10,
        objectives=1,
        sampler="random",
        fidelity={"rungs": [10, 20, "all"], "pruner": "wilcoxon", "p_threshold": 0.5},
    )
    summary = run_search(space, pool=ItemPool(space), progress=False)
    study, records = study_and_store_pruned(space)
    assert summary.n_pruned and summary.n_complete
    (task,) = [o.task for o in space.objectives]
    order = TrialStore(space.storage_url).item_order(space.study_name)[task]
    for trial in study.trials:
        scored = len(trial.intermediate_values)
        assert scored in (10, 20, ITEMS) and (trial.state.name == "COMPLETE") == (scored == ITEMS)
        genome = records[trial.number].genome
        assert trial.intermediate_values == {
            place: item_value(genome, task, order[place]) for place in range(scored)
        }  # step = the item's place in the order, value = its score
