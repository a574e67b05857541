"""TPE's good group holds complete trials only (evomerge.search.tpe).

A halving search stops most trials low and tells optuna PRUNED without values; optuna's TPE tops
its good group up with those in trial order when complete trials are few, and then samples around
the earliest losers. These studies have many early pruned trials at x near 0 and three complete
ones near 0.9: evomerge's TPE samples near the complete ones, optuna's (the control, so the test
can fail) near the pruned ones. Without pruned trials both sample the same values.
"""

from __future__ import annotations

import statistics

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.samplers import TPESampler
from optuna.trial import TrialState, create_trial

from evomerge.search.samplers import make_sampler
from evomerge.search.tpe import FullBudgetTPESampler

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
