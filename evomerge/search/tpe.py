"""TPE for searches that stop most trials at a low rung (successive halving).

optuna's TPE splits the finished trials into a good group of `gamma(n)` trials and the rest. When
the study has fewer complete trials than that, it tops the good group up with PRUNED trials, and a
pruned trial without intermediate values (a multi-objective study cannot report any) scores like
every other, so the *earliest* stopped trials fill it: TPE then samples around the first losers
(`results/fitness.md` has the effect: optuna's TPE stays at the enqueued uniform mix). Capping
`gamma(n)` at the number of complete trials keeps pruned trials in the other group, where they
belong: each lost at its rung to trials that went on. A study without pruned trials samples
exactly as optuna's TPE does, since its n is then the number of complete trials.

Full-budget scores alone are few in a halving search (one trial in eta^2 or fewer goes all the
way), so TPE would model a hundred trials from a handful. When the search records each trial's
values at every rung it reached (user attribute `values at rung R`, written by the search loop), the
sampler models the highest rung that at least `n_startup_trials` trials reached, as BOHB does: the
good group is the best gamma(n) of those trials by their values at that rung (optuna's own split,
non-domination and hypervolume in a multi-objective study), and every other finished trial is in
the other group. Once enough trials are complete, that rung is the full budget.

optuna deprecated `gamma` in 4.9 and will remove it in 6.0 (pyproject keeps optuna below 6); the
rung model reuses TPESampler's private `_sample` steps and `_split_trials` (optuna 5).
tests/test_tpe_good_group.py fails if either stops working.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from optuna.samplers import TPESampler
from optuna.trial import FrozenTrial, TrialState, create_trial

RUNG_VALUES = "values at rung "  # + the rung's index: a trial's told values on that rung's items


def rung_values_attr(rung: int) -> str:
    """The user attribute that holds a trial's values at `rung` (what optuna would be told)."""
    return f"{RUNG_VALUES}{rung}"


def values_by_rung(trial: FrozenTrial) -> dict[int, list[float]]:
    """The values a trial recorded at each rung it finished (none outside a halving search)."""
    found = {}
    for key, values in trial.user_attrs.items():
        rung = key.removeprefix(RUNG_VALUES)
        if rung != key and rung.isdigit() and _finite_numbers(values):
            found[int(rung)] = [float(v) for v in values]
    return found


def _finite_numbers(values: Any) -> bool:
    """A non-empty list of finite numbers (a NaN score leaves the trial out of its rung's model)."""
    return isinstance(values, list) and bool(values) and all(_finite(v) for v in values)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def optuna_default_gamma(n: int, objectives: int) -> int:
    """optuna's own good-group size for n finished trials (single- and multi-objective)."""
    return min(math.ceil(0.1 * n), 25) if objectives <= 1 else math.ceil(0.1 * n)


class CompleteTrialsGamma:
    """gamma(n) for TPE: the user's or optuna's, never more than the study's complete trials.

    `observe(study)` is called before every sampling call, so the count is the study's now."""

    def __init__(self, gamma: Callable[[int], int] | None = None):
        self.gamma = gamma
        self.complete = 0
        self.objectives = 1

    def observe(self, study: Any) -> None:
        self.complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        self.objectives = len(study.directions)

    def wanted(self, n: int, objectives: int) -> int:
        """gamma(n) as the user or optuna sets it, before the cap."""
        return self.gamma(n) if self.gamma is not None else optuna_default_gamma(n, objectives)

    def __call__(self, n: int) -> int:
        return min(self.wanted(n, self.objectives), self.complete)


class FullBudgetTPESampler(TPESampler):
    """optuna's TPESampler (same options) with `CompleteTrialsGamma` as its gamma."""

    def __init__(self, *, gamma: Callable[[int], int] | None = None, **options: Any):
        self._good_group = CompleteTrialsGamma(gamma)
        with warnings.catch_warnings():  # the deprecation of `gamma`: see the module docstring
            warnings.filterwarnings("ignore", message=".*gamma.*deprecated", category=FutureWarning)
            super().__init__(gamma=self._good_group, **options)

    def sample_relative(self, study, trial, search_space):
        self._good_group.observe(study)
        return super().sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        self._good_group.observe(study)
        return super().sample_independent(study, trial, param_name, param_distribution)

    def _sample(self, study, trial, search_space):
        """optuna's TPE step with the good group drawn from the highest well-populated rung."""
        from optuna.samplers._tpe.sampler import _split_trials

        states = (TrialState.COMPLETE, TrialState.PRUNED)
        finished = study._get_trials(deepcopy=False, states=states, use_cache=True)
        stand_ins = rung_stand_ins(finished, max(1, self._n_startup_trials))
        if stand_ins is None:
            return super()._sample(study, trial, search_space)
        at_rung = sum(t.state == TrialState.COMPLETE for t in stand_ins)
        below, above = _split_trials(study, stand_ins, min(self.good_group_size(study, at_rung), at_rung))
        return self.sample_between(study, trial, search_space, below, above)

    def good_group_size(self, study, n: int) -> int:
        """gamma(n) as the user or optuna sets it, not capped by the complete trials."""
        return self._good_group.wanted(n, len(study.directions))

    def sample_between(self, study, trial, search_space, below: list[FrozenTrial], above: list[FrozenTrial]):
        """optuna's TPE step for a good group `below` and the rest `above` (running trials join the
        rest under constant_liar)."""
        if self._constant_liar:
            running = study._get_trials(deepcopy=False, states=(TrialState.RUNNING,), use_cache=False)
            above = above + [t for t in running if t.number != trial.number]
        good = self._build_parzen_estimator(study, search_space, below, handle_below=True)
        other = self._build_parzen_estimator(study, search_space, above, handle_below=False)
        candidates = good.sample(self._rng.rng, self._n_ei_candidates)
        chosen = TPESampler._compare(candidates, self._compute_acquisition_func(candidates, good, other))
        return {name: dist.to_external_repr(chosen[name]) for name, dist in search_space.items()}


def rung_stand_ins(finished: list[FrozenTrial], enough: int) -> list[FrozenTrial] | None:
    """The finished trials as TPE should split them: those that reached the highest rung with at
    least `enough` trials, as COMPLETE with their values there; the rest as PRUNED (optuna fills the
    good group from complete trials first, so they stay in the other group). None when no trial
    recorded rung values."""
    rungs = {t.number: values_by_rung(t) for t in finished}
    reached: dict[int, int] = {}
    for by_rung in rungs.values():
        for rung in by_rung:
            reached[rung] = reached.get(rung, 0) + 1
    if not reached:
        return None
    top = max((rung for rung, count in reached.items() if count >= enough), default=min(reached))
    stand_ins = []
    for t in finished:
        values = rungs[t.number].get(top)
        # A complete trial without values at the modelled rung (a resumed study) joins the other group.
        stand_ins.append(t if values is None and t.state == TrialState.PRUNED else stand_in(t, values))
    return stand_ins


def stand_in(trial: FrozenTrial, values: list[float] | None) -> FrozenTrial:
    """`trial` as TPE is to see it: COMPLETE with `values`, or PRUNED (None); same number and genome."""
    state = TrialState.PRUNED if values is None else TrialState.COMPLETE
    made = create_trial(state=state, values=values, params=trial.params, distributions=trial.distributions)
    made.number = trial.number
    return made
