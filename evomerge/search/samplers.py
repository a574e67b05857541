"""optuna samplers by name, seeded, with evomerge's defaults for small, noisy merge searches.

`search.sampler_options` are checked against the sampler class's constructor before anything is
built: an option it does not take is a one-line error with a suggestion, and an option whose
default is a number or a boolean gets a value of that kind (through the config files' one
coercion of numbers), so a typo or `n_startup_trials: ten` fails in `validate`, not mid-search.
"""

from __future__ import annotations

import difflib
import inspect
import re
from typing import Any

from evomerge.config.numbers import coerce_bool, coerce_number
from evomerge.config.space import SearchSpace
from evomerge.errors import ConfigError

# Set from the space file's own fields, never through sampler_options.
_OWN_OPTIONS = {"seed": "search.seed"}


def sampler_class(name: str):
    import optuna

    return {
        "tpe": optuna.samplers.TPESampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "random": optuna.samplers.RandomSampler,
    }[name]


def checked_sampler_options(space: SearchSpace) -> dict[str, Any]:
    """`search.sampler_options` validated against the sampler's constructor signature."""
    spec = space.search
    cls = sampler_class(spec.sampler)
    parameters = inspect.signature(cls).parameters
    options: dict[str, Any] = {}
    for name, value in spec.sampler_options.items():
        field = f"search.sampler_options.{name}"
        if name in _OWN_OPTIONS:
            raise ConfigError(f"set the seed with {_OWN_OPTIONS[name]}, not here", file=space.source_path, field=field)
        if name not in parameters:
            close = difflib.get_close_matches(str(name), list(parameters), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            takes = ", ".join(p for p in parameters if p not in _OWN_OPTIONS) or "no options"
            raise ConfigError(
                f"the {spec.sampler} sampler takes no option '{name}' (it takes: {takes}){hint}", file=space.source_path, field=field
            )
        kinds = _value_kinds(parameters[name].annotation, parameters[name].default)
        if not kinds & {bool, int, float, str, dict, list}:
            raise ConfigError(
                f"the {spec.sampler} sampler's '{name}' takes a Python object, which a space file cannot give",
                file=space.source_path,
                field=field,
            )
        try:
            if value is not None and not isinstance(value, tuple(kinds - {int, float, bool})):
                if bool in kinds:
                    value = coerce_bool(value)
                elif int in kinds and float not in kinds:
                    value = coerce_number(value, integer=True)
                elif float in kinds:
                    value = coerce_number(value)
        except ValueError as exc:
            raise ConfigError(str(exc), file=space.source_path, field=field) from None
        options[name] = value
    return options


_PLAIN = {"bool": bool, "int": int, "float": float, "str": str, "dict": dict, "list": list, "Sequence": list, "Mapping": dict}


def _value_kinds(annotation: Any, default: Any) -> set[type]:
    """The plain types an option's annotation allows (read from its text: optuna annotates with
    names only imported for type checkers), else its default's type; `object` for anything else."""
    if annotation is inspect.Parameter.empty:
        return {type(default)} if default not in (None, inspect.Parameter.empty) else {object}
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts, depth, current = [], 0, ""
    for char in text:  # split on the top-level '|' of a union
        depth += char == "["
        depth -= char == "]"
        if char == "|" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    kinds = set()
    for part in (p.strip() for p in parts):
        if part in ("None", "NoneType"):
            continue
        outer, _, inner = part.partition("[")
        plain_inner = all(name in ("str", "int", "float", "bool", "Any") for name in re.findall(r"[A-Za-z_][\w.]*", inner))
        kinds.add(_PLAIN.get(outer.removeprefix("typing.").removeprefix("collections.abc."), object) if plain_inner else object)
    return kinds or {object}


def make_sampler(space: SearchSpace):
    import optuna

    spec = space.search
    options = checked_sampler_options(space)
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
    except (TypeError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"invalid option for the {spec.sampler} sampler ({first})", file=space.source_path, field="search.sampler_options") from None
