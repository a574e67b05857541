"""TPE's good group holds complete trials only (evomerge.search.tpe).

A halving search stops most trials low and tells optuna PRUNED without values; optuna's TPE tops
its good group up with those in trial order when complete trials are few, and then samples around
the earliest losers. These studies have many early pruned trials at x near 0 and three complete
ones near 0.9: evomerge's TPE samples near the complete ones, optuna's (the control, so the test
can fail) near the pruned ones. Without pruned trials both sample the same values.

With each trial's values at every rung it reached (what the search loop records), the sampler
models the highest rung that enough trials reached: a hundred first-rung scores lead it before a
handful of full-budget ones can.
"""

from __future__ import annotations

import statistics

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.samplers import TPESampler
from optuna.trial import TrialState, create_trial

from evomerge.search.samplers import make_sampler
from evomerge.search.tpe import FullBudgetTPESampler, rung_stand_ins, rung_values_attr

SPACE = {"x": FloatDistribution(0.0, 1.0)}


def _study(sampler, objectives: int, *, pruned: int, complete: int = 3):
    study = optuna.create_study(directions=["maximize"] * objectives, sampler=sampler)
    for i in range(pruned):  # the first trials: stopped at a low rung
        study.add_trial(create_trial(params={"x": 0.02 + 0.0002 * i}, distributions=SPACE, state=TrialState.PRUNED))
    for i in range(complete):
        value = 0.9 - 0.01 * i
        study.add_trial(
            create_trial(
                params={"x": 0.9 + 0.09 * i / complete},
                distributions=SPACE,
                **({"value": value} if objectives == 1 else {"values": [value] * objectives}),
            )
        )
    return study


def _sampled(study, n: int = 20) -> list[float]:
    xs = []
    for _ in range(n):
        trial = study.ask(SPACE)
        xs.append(trial.params["x"])
        study.tell(trial, state=TrialState.FAIL)  # TPE reads no failed trial
    return xs


@pytest.mark.parametrize("objectives", [1, 4])
def test_pruned_trials_never_fill_the_good_group(objectives):
    ours = _sampled(_study(FullBudgetTPESampler(seed=0, multivariate=True), objectives, pruned=200))
    optunas = _sampled(_study(TPESampler(seed=0, multivariate=True), objectives, pruned=200))
    assert statistics.median(ours) > 0.8, ours
    assert statistics.median(optunas) < 0.5, optunas  # the flaw the cap removes


@pytest.mark.parametrize("objectives", [1, 4])
def test_without_pruned_trials_it_samples_as_optunas_tpe(objectives):
    ours = _sampled(_study(FullBudgetTPESampler(seed=3, multivariate=True), objectives, pruned=0, complete=30))
    optunas = _sampled(_study(TPESampler(seed=3, multivariate=True), objectives, pruned=0, complete=30))
    assert ours == optunas


def test_the_named_samplers_use_it():
    assert isinstance(make_sampler("tpe", seed=0, options={}), FullBudgetTPESampler)
    assert isinstance(make_sampler("cmaes", seed=0, options={})._independent_sampler, FullBudgetTPESampler)


def _halving_study(sampler, objectives: int, *, complete: int):
    """A halving search's record: 100 trials scored on the first rung (best near x = 0.7), of which
    the first `complete` went on to the full budget (scored near x = 0.1, where the first trials were
    drawn) and the rest stopped there."""
    study = optuna.create_study(directions=["maximize"] * objectives, sampler=sampler)
    for i in range(100):
        x = 0.1 + 0.001 * i if i < complete else (i - complete) / 100
        low = 1.0 - abs(x - 0.7)
        attrs = {rung_values_attr(0): [low] * objectives}
        if i < complete:
            attrs[rung_values_attr(1)] = [0.5 + 0.01 * i] * objectives
            values = {"value": 0.5 + 0.01 * i} if objectives == 1 else {"values": [0.5 + 0.01 * i] * objectives}
            study.add_trial(create_trial(params={"x": x}, distributions=SPACE, user_attrs=attrs, **values))
        else:
            study.add_trial(
                create_trial(params={"x": x}, distributions=SPACE, user_attrs=attrs, state=TrialState.PRUNED)
            )
    return study


@pytest.mark.parametrize("objectives", [1, 4])
def test_a_halving_search_is_modelled_on_its_well_populated_rung(objectives):
    few_complete = _sampled(_halving_study(FullBudgetTPESampler(seed=0, multivariate=True), objectives, complete=3))
    assert abs(statistics.median(few_complete) - 0.7) < 0.1, few_complete  # the first rung leads
    # optuna's own and the cap alone (no rung values read) stay near the three complete trials
    capped = _sampled(_halving_study(TPESampler(seed=0, multivariate=True), objectives, complete=3))
    assert statistics.median(capped) < 0.3, capped


def test_the_stand_ins_take_the_highest_rung_that_enough_trials_reached():
    study = _halving_study(None, 1, complete=3)
    finished = study.get_trials(deepcopy=False)
    first_rung = rung_stand_ins(finished, enough=10)
    assert all(t.state == TrialState.COMPLETE for t in first_rung)
    assert [t.value for t in first_rung] == [t.user_attrs[rung_values_attr(0)][0] for t in finished]
    full = rung_stand_ins(finished, enough=3)
    assert [t.number for t in full if t.state == TrialState.COMPLETE] == [0, 1, 2]
    assert rung_stand_ins([create_trial(params={"x": 0.5}, distributions=SPACE, value=1.0)], enough=1) is None
