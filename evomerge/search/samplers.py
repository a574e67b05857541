"""optuna samplers by name, seeded, with evomerge's defaults for small, noisy merge searches."""

from __future__ import annotations

from typing import Any

from evomerge.config.space import SearchSpace
from evomerge.errors import ConfigError


def make_sampler(space: SearchSpace):
    import optuna

    spec = space.search
    options: dict[str, Any] = dict(spec.sampler_options)
    seed = spec.seed
    try:
        if spec.sampler == "tpe":
            options.setdefault("multivariate", True)
            options.setdefault("n_startup_trials", 8)
            return optuna.samplers.TPESampler(seed=seed, **options)
        if spec.sampler == "cmaes":
            # CMA-ES is single-objective (the weighted sum) and cannot sample categorical genes
            # (the method); those go to TPE, quietly.
            options.setdefault("warn_independent_sampling", False)
            options.setdefault("independent_sampler", optuna.samplers.TPESampler(seed=seed))
            return optuna.samplers.CmaEsSampler(seed=seed, **options)
        if spec.sampler == "nsga2":
            options.setdefault("population_size", 10)
            return optuna.samplers.NSGAIISampler(seed=seed, **options)
        return optuna.samplers.RandomSampler(seed=seed, **options)
    except TypeError as exc:
        raise ConfigError(f"invalid option for the {spec.sampler} sampler ({exc})", file=space.source_path, field="search.sampler_options") from None
