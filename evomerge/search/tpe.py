"""TPE whose good group holds complete (full-budget) trials only.

optuna's TPE splits the finished trials into a good group of `gamma(n)` trials and the rest. When
the study has fewer complete trials than that, it tops the good group up with PRUNED trials, and a
pruned trial without intermediate values (evomerge reports none: rung scores are not comparable
across rungs) scores like every other, so the *earliest* stopped trials fill it. A successive-
halving search stops most trials low, so its good group fills with the first losers (on the demo:
the enqueued parents alone) and TPE samples around them (`results/fitness.md` has the effect).
Capping `gamma(n)` at the number of complete trials keeps pruned trials in the other group, where
they belong: each lost at its rung to trials that went on. A study without pruned trials samples
exactly as optuna's TPE does, since its n is then the number of complete trials.

optuna deprecated `gamma` in 4.9 and will remove it in 6.0 (pyproject keeps optuna below 6);
tests/test_tpe_good_group.py fails if the cap stops working.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from optuna.samplers import TPESampler
from optuna.trial import TrialState


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

    def __call__(self, n: int) -> int:
        wanted = self.gamma(n) if self.gamma is not None else optuna_default_gamma(n, self.objectives)
        return min(wanted, self.complete)


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
