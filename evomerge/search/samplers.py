"""optuna samplers by name, seeded, with evomerge's defaults for small, noisy merge searches.

`FACTORIES` is the one table of names a space file may give as `search.sampler`: the schema
validates against it, and adding a sampler is one factory below plus one line in the table.
(`run_search(sampler=...)` takes any optuna sampler object instead, for what a file cannot say.)

`search.sampler_options` are checked against the sampler class's constructor before anything is
built: an option it does not take is a one-line error with a suggestion, and an option whose
default is a number or a boolean gets a value of that kind (through the config files' one
coercion of numbers), so a typo or `n_startup_trials: ten` fails in `validate`, not mid-search.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from evomerge.config.numbers import coerce_bool, coerce_number
from evomerge.errors import ConfigError, first_line
from evomerge.suggest import did_you_mean

if TYPE_CHECKING:
    from optuna.samplers import BaseSampler

# Set from the space file's own fields, never through sampler_options.
_OWN_OPTIONS = {"seed": "search.seed"}


def _tpe(seed: int | None, options: dict[str, Any]) -> BaseSampler:
    from evomerge.search.tpe import FullBudgetTPESampler  # optuna's, but pruned trials never "good"

    options.setdefault("multivariate", True)
    options.setdefault("n_startup_trials", 8)
    return FullBudgetTPESampler(seed=seed, **options)


def _cmaes(seed: int | None, options: dict[str, Any]) -> BaseSampler:
    from optuna.samplers import CmaEsSampler

    from evomerge.search.tpe import FullBudgetTPESampler

    # CMA-ES is single-objective (the weighted sum) and cannot sample categorical genes
    # (the method); those go to TPE, quietly.
    options.setdefault("warn_independent_sampling", False)
    options.setdefault("independent_sampler", FullBudgetTPESampler(seed=seed))
    return CmaEsSampler(seed=seed, **options)


def _nsga2(seed: int | None, options: dict[str, Any]) -> BaseSampler:
    from optuna.samplers import NSGAIISampler

    options.setdefault("population_size", 10)
    return NSGAIISampler(seed=seed, **options)


def _random(seed: int | None, options: dict[str, Any]) -> BaseSampler:
    from optuna.samplers import RandomSampler

    return RandomSampler(seed=seed, **options)


class SamplerFactory(NamedTuple):
    """How a named sampler is built: its optuna class (whose constructor the options are checked
    against) and a function of the seed and the checked options that builds it."""

    class_name: str  # a name in optuna.samplers
    build: Callable[[int | None, dict[str, Any]], BaseSampler]


FACTORIES: dict[str, SamplerFactory] = {
    "tpe": SamplerFactory("TPESampler", _tpe),
    "cmaes": SamplerFactory("CmaEsSampler", _cmaes),
    "nsga2": SamplerFactory("NSGAIISampler", _nsga2),
    "random": SamplerFactory("RandomSampler", _random),
}


def sampler_class(name: str) -> type[BaseSampler]:
    import optuna

    return getattr(optuna.samplers, FACTORIES[name].class_name)


def checked_sampler_options(sampler: str, given: Mapping[str, Any], source: Path | None = None) -> dict[str, Any]:
    """`search.sampler_options` (`given`) validated against the sampler's constructor signature;
    errors name the space file `source`."""
    parameters = inspect.signature(sampler_class(sampler)).parameters
    options: dict[str, Any] = {}
    for name, value in given.items():
        field = f"search.sampler_options.{name}"
        if name in _OWN_OPTIONS:
            raise ConfigError(f"set the seed with {_OWN_OPTIONS[name]}, not here", file=source, field=field)
        if name not in parameters:
            hint = did_you_mean(name, parameters)
            takes = ", ".join(p for p in parameters if p not in _OWN_OPTIONS) or "no options"
            raise ConfigError(
                f"the {sampler} sampler takes no option '{name}' (it takes: {takes}){hint}", file=source, field=field
            )
        kinds = _value_kinds(parameters[name].annotation, parameters[name].default)
        if not kinds & {bool, int, float, str, dict, list}:
            raise ConfigError(
                f"the {sampler} sampler's '{name}' takes a Python object, which a space file cannot give",
                file=source,
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
            raise ConfigError(str(exc), file=source, field=field) from None
        options[name] = value
    return options


_PLAIN = {
    "bool": bool,
    "int": int,
    "float": float,
    "str": str,
    "dict": dict,
    "list": list,
    "Sequence": list,
    "Mapping": dict,
}


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
        plain_inner = all(
            name in ("str", "int", "float", "bool", "Any") for name in re.findall(r"[A-Za-z_][\w.]*", inner)
        )
        kinds.add(
            _PLAIN.get(outer.removeprefix("typing.").removeprefix("collections.abc."), object)
            if plain_inner
            else object
        )
    return kinds or {object}


def make_sampler(
    sampler: str, *, seed: int | None, options: Mapping[str, Any], source: Path | None = None
) -> BaseSampler:
    """The sampler the table names `sampler` (a space's search.sampler), seeded, its options
    (search.sampler_options) checked first; errors name the space file `source`."""
    checked = checked_sampler_options(sampler, options, source)
    try:
        return FACTORIES[sampler].build(seed, checked)
    except (TypeError, ValueError) as exc:
        first = first_line(exc)
        message = f"invalid option for the {sampler} sampler ({first})"
        raise ConfigError(message, file=source, field="search.sampler_options") from None
