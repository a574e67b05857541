"""The method catalogue: each merge method's parameters and input rules, declared once.

A `MethodSpec` says everything the rest of evomerge needs to know about a method: its typed
parameters (`Param`: per-model or global, default or required, the values it may take, the range
a genome searches and the values that express "one parent alone" and "the uniform mix"), how it
uses the base model, how many models it takes, and the function that does the math. The planner,
the validator, `evomerge methods`, the genome and the export read these specs and nothing else.

Adding a method is one module that builds a `MethodSpec` and one `register(...)` line in
`evomerge/merge/catalogue.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from evomerge.config.numbers import ParameterRange
from evomerge.suggest import did_you_mean

if TYPE_CHECKING:
    from evomerge.merge.trim import TaskVectorKind

Scope = Literal["model", "global"]
BaseRule = Literal["required", "optional", "unused"]
# How a genome fills a parameter when it seeds "one parent alone" or "the uniform mix":
# "one_hot" (1 for the chosen parent, 0 for the others), "share" (1/number of fine-tunes),
# "low" (the low end of the searched range), or a fixed number.
SeedRule = Literal["one_hot", "share", "low"] | float

# The math of one output tensor: (tensors, resolved per-model params, resolved global params,
# base_index, seed) -> merged tensor; implementations that write block by block also take `out=`.
MergeFunction = Callable[..., torch.Tensor]
# Extra validation of resolved parameters beyond each Param's range (e.g. della's density +- epsilon):
# (resolved per-model params, resolved global params, base_index). Raises ValueError with the reason;
# the caller puts "<method>: " in front.
ParamCheck = Callable[[list[dict[str, float]], dict[str, Any], int | None], None]
# Extra rule on the inputs beyond min/max_models: (number of tensors, base_index), checked with the
# counts, before any parameter is read. Raises ValueError with the whole message.
ModelsCheck = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method."""

    name: str
    scope: Scope
    default: float | bool | None = None  # None: required (per-model parameters: never for the base)
    valid: ParameterRange = field(default_factory=ParameterRange)  # the values a config may give
    search: tuple[float, float] | float | None = None  # a genome's default gene range; None: not a gene
    alone: SeedRule | None = None  # the value that reproduces one parent alone (None: "low")
    uniform: SeedRule | None = None  # the value of the plain average of the fine-tunes (None: "low")

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: tuple[Param, ...]
    base: BaseRule
    min_models: int  # counting the base when it takes part
    max_models: int | None
    random: bool  # draws masks or samples from its seed
    doc: str  # one line, for `evomerge methods` and --help
    merge: MergeFunction
    writes_out: bool = False  # `merge` accepts out= and fills it block by block
    count_hint: str = ""  # appended to a wrong-model-count error, e.g. " (a base and one other)"
    check: ParamCheck | None = None
    check_models: ModelsCheck | None = None
    # The generalized task-arithmetic pipeline's settings (sparsifier, sign consensus) for methods
    # that run it: their `merge` also takes histogram= (the cross-trial delta cache), and the
    # fused C kernel can take their tensors.
    task_vector: TaskVectorKind | None = None
    # Genome use. A method is searchable when it declares genes; `picks_by` names the per-model
    # gene whose largest value picks the one fine-tune a two-model method merges with the base.
    searchable: bool = False
    picks_by: str | None = None
    parent_rank: int | None = None  # preference (low first) for seeding "one parent alone" exactly
    uniform_rank: int | None = None  # preference for seeding the uniform mix
    # A data method's per-model statistic ("fisher": diagonal Fisher, "gram": linear-layer input
    # Gram matrices), computed by evomerge.data_stats; its `merge` takes them as statistics=.
    statistic: str | None = None

    @property
    def global_params(self) -> dict[str, float | bool | None]:
        """name -> default (None = required) of the global parameters, in declaration order."""
        return {p.name: p.default for p in self.params if p.scope == "global"}

    @property
    def model_params(self) -> dict[str, float | bool | None]:
        """name -> default (None = required) of the per-model parameters, in declaration order."""
        return {p.name: p.default for p in self.params if p.scope == "model"}

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def genes(self, scope: Scope) -> tuple[str, ...]:
        """The parameters of `scope` a genome searches (plus the picking gene for per-model)."""
        names = [p.name for p in self.params if p.scope == scope and p.search is not None]
        if scope == "model" and self.picks_by and self.picks_by not in names:
            names.insert(0, self.picks_by)
        return tuple(names)


METHODS: dict[str, MethodSpec] = {}


def _gene_facts(param: Param) -> tuple:
    """What a gene means to the genome and the space file (its default may differ per method)."""
    return param.scope, param.valid, param.search, param.alone, param.uniform


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the catalogue (names are unique; a gene name means one thing everywhere)."""
    if spec.name in METHODS:
        raise ValueError(f"merge method '{spec.name}' is registered twice")
    for param in spec.params:
        for other in METHODS.values():
            for known in other.params:
                searched = known.search is not None and param.search is not None
                if known.name == param.name and searched and _gene_facts(known) != _gene_facts(param):
                    raise ValueError(
                        f"gene '{param.name}' of {spec.name} differs from that of {other.name}: a gene name must "
                        "mean the same scope, valid values, search range and seed rules in every method"
                    )
    METHODS[spec.name] = spec
    return spec


def _load_catalogue() -> None:
    """Register the built-in methods (importing the catalogue does) before the first look-up."""
    from evomerge.merge import catalogue  # noqa: F401


def get_method(name: str) -> MethodSpec:
    """The spec of merge method `name`; a ValueError with a suggestion for unknown names."""
    _load_catalogue()
    spec = METHODS.get(name)
    if spec is not None:
        return spec
    hint = did_you_mean(name, METHODS, parenthesised=True)
    raise ValueError(f"unknown merge method '{name}'; expected one of: {', '.join(METHODS)}{hint}")


def searchable_methods() -> dict[str, MethodSpec]:
    _load_catalogue()
    return {name: spec for name, spec in METHODS.items() if spec.searchable}


def gene_params() -> dict[str, Param]:
    """Every gene name any searchable method uses -> its Param (the same in every method):
    per-model genes first, then global ones, each in catalogue order."""
    genes: dict[str, Param] = {}
    for scope in ("model", "global"):
        for spec in searchable_methods().values():
            for param in spec.params:
                if param.scope == scope and param.search is not None:
                    genes.setdefault(param.name, param)
    return genes


def ranked(rank: str) -> list[str]:
    """Searchable methods with a `parent_rank`/`uniform_rank`, best first."""
    _load_catalogue()
    found = [(getattr(spec, rank), name) for name, spec in METHODS.items() if getattr(spec, rank) is not None]
    return [name for _, name in sorted(found)]
