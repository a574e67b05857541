"""The space file's `genome:` section for the `parameters` genome (per-layer-group method and
parameter genes): one range field per gene of the method catalogue, so a method that brings a new
gene brings its space-file key with it.
"""

from __future__ import annotations

import itertools
import keyword
import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator

from evomerge.config.base import StrictModel
from evomerge.config.numbers import Integer, coerce_number
from evomerge.merge.params import resolve_globals, resolve_model_params
from evomerge.merge.registry import MethodSpec, gene_params, get_method, searchable_methods
from evomerge.suggest import did_you_mean

GeneRange = float | tuple[float, float]


def _gene_field(gene: str) -> str:
    """The GenomeSpec attribute of a gene (`lambda` is a Python keyword: `lambda_`)."""
    return f"{gene}_" if keyword.iskeyword(gene) else gene


class _GenomeOptions(StrictModel):
    """The genome's fields other than the gene ranges (GenomeSpec adds one per catalogue gene)."""

    kind: Literal["parameters"] = "parameters"
    layer_granularity: Integer = Field(
        0, ge=0, description="layers per group (must divide the layer count); 0 = one group"
    )
    filters: list[str] = Field(default_factory=list, description="tensor-name substrings with their own genes")
    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic"])
    method_per_group: bool = True
    embeddings: bool = True  # own genes for the input embeddings (else: those of the first group)
    head: bool = True  # own genes for the final norm and lm_head (else: those of the last group)

    model_config = ConfigDict(populate_by_name=True)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one merge method")
        searchable = tuple(searchable_methods())
        for method in value:
            if method not in searchable:
                raise ValueError(
                    f"'{method}' cannot be searched (choose from: {', '.join(searchable)}){did_you_mean(method, searchable)}"
                )
        if len(set(value)) != len(value):
            raise ValueError("a method is listed twice")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _range(cls, value: Any, info: ValidationInfo) -> Any:
        """A gene's range: a fixed number or [low, high], inside the values its parameter may take."""
        name = next((gene for gene in gene_params() if _gene_field(gene) == info.field_name), None)
        if name is None:
            return value
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(f"expected a number or a [low, high] range, got {value!r}")
            try:
                low, high = (coerce_number(v) for v in value)
            except ValueError as exc:
                raise ValueError(f"{exc} in the range {list(value)!r}") from None
            if low >= high:
                raise ValueError(f"expected low < high, got {list(value)}")
            bounds = (low, high)
        else:
            try:
                bounds = (coerce_number(value),)
            except ValueError as exc:
                raise ValueError(f"{exc} (expected a number or a [low, high] range)") from None
        declared = gene_params()[name].valid
        if min(bounds) < declared.low or max(bounds) > declared.high:  # a search never goes past the bounds
            raise ValueError(
                f"values must lie in {declared.describe()}, got {value!r}"
                + (f" ({declared.why})" if declared.why else "")
            )
        return bounds if len(bounds) == 2 else bounds[0]

    @model_validator(mode="after")
    def _bounds(self) -> _GenomeOptions:
        """Each method must accept every corner of the ranges it searches (della: density - epsilon > 0
        and density + epsilon < 1), so no trial can fail on values the file allowed."""
        for method in self.methods:
            problem = self._corner_problem(get_method(method))
            if problem:
                raise ValueError(problem)
        return self

    def _corner_problem(self, spec: MethodSpec) -> str | None:
        if spec.check is None:
            return None
        genes = [(gene, "model") for gene in spec.genes("model")] + [(gene, "global") for gene in spec.genes("global")]
        ends = [self._ends(gene) for gene, _ in genes]
        base_index = None if spec.base == "unused" else 0
        for values in itertools.product(*ends):
            per_model = {
                gene: value
                for (gene, scope), value in zip(genes, values)
                if scope == "model" and gene in spec.model_params
            }
            options = {gene: value for (gene, scope), value in zip(genes, values) if scope == "global"}
            given = [per_model] if base_index is None else [{}, per_model]
            try:
                resolved = resolve_model_params(spec, given, len(given), base_index)
                spec.check(resolved, resolve_globals(spec, options), base_index)
            except ValueError as exc:
                reason = re.sub(r" \(model \d+\)$", "", str(exc))
                return f"{spec.name} cannot take every value the genome searches: {reason}"
        return None

    def _ends(self, gene: str) -> tuple[float, ...]:
        bounds = self.gene_range(gene)
        return bounds if isinstance(bounds, tuple) else (bounds,)

    def gene_range(self, name: str) -> GeneRange:
        return getattr(self, _gene_field(name))

    def merge_methods(self) -> list[str]:
        """The merge methods a trial may use (the space checks that those needing a base get one)."""
        return list(self.methods)


# One range field per gene of the catalogue (YAML key = gene name), defaulting to the gene's search
# range; `normalize` (None: each method's mergekit default) comes after them.
GenomeSpec = create_model(
    "GenomeSpec",
    __base__=_GenomeOptions,
    __module__=__name__,
    **{
        _gene_field(gene): (GeneRange, Field(param.search, alias=gene if _gene_field(gene) != gene else None))
        for gene, param in gene_params().items()
    },
    normalize=(bool | None, None),
)
