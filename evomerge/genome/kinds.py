"""The genome kinds a space file may name in `genome.kind`, and the one factory that builds them.

Adding a kind is one module (its pydantic spec with a `kind: Literal["name"]` field and a
`merge_methods()` method, and a class satisfying `evomerge.genome.protocol.Genome` built as
`cls(space, models)`) plus one line in `GENOME_KINDS`. The space schema validates `genome:`
against the spec the `kind` names (`parameters` when absent).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, Union

from pydantic import BaseModel, Discriminator, Tag

from evomerge.genome.dataflow import DataflowGenomeSpec
from evomerge.genome.spec import GenomeSpec
from evomerge.moe.genome import MoEGenomeSpec

if TYPE_CHECKING:
    from evomerge.config.space import SearchSpace
    from evomerge.genome.protocol import Genome
    from evomerge.io.model_dir import ModelDir

DEFAULT_KIND = "parameters"


class GenomeKind(NamedTuple):
    spec: type[BaseModel]  # the `genome:` section's schema
    genome: str  # "module:Class" of the implementation, imported when a genome is built


GENOME_KINDS: dict[str, GenomeKind] = {
    "parameters": GenomeKind(GenomeSpec, "evomerge.genome.parameters:ParameterGenome"),
    "dataflow": GenomeKind(DataflowGenomeSpec, "evomerge.genome.dataflow:DataflowGenome"),
    "moe": GenomeKind(MoEGenomeSpec, "evomerge.moe.genome:MoEGenome"),
}


def _kind_of(value: Any) -> str:
    if isinstance(value, Mapping):
        return str(value.get("kind", DEFAULT_KIND))
    return str(getattr(value, "kind", DEFAULT_KIND))


def _spec_field() -> Any:
    """The annotation of SearchSpace.genome: the one spec, or a union tagged by `kind`."""
    specs = [Annotated[kind.spec, Tag(name)] for name, kind in GENOME_KINDS.items()]
    if len(specs) == 1:
        return GENOME_KINDS[DEFAULT_KIND].spec
    choices = ", ".join(GENOME_KINDS)
    discriminator = Discriminator(
        _kind_of,
        custom_error_type="genome_kind",
        custom_error_message=f"unknown genome kind (choose from: {choices})",
        custom_error_context={"evomerge_field": "kind"},  # reported on genome.kind, the key the user wrote
    )
    return Annotated[Union[tuple(specs)], discriminator]  # noqa: UP007 (a runtime tuple of members)


GenomeSpecField = _spec_field()


def default_genome_spec() -> BaseModel:
    return GENOME_KINDS[DEFAULT_KIND].spec()


def genome_tags() -> frozenset[str]:
    """The kind names pydantic puts in an error's location (dropped when the error is reported)."""
    return frozenset(GENOME_KINDS) if len(GENOME_KINDS) > 1 else frozenset()


def make_genome(space: SearchSpace, models: Mapping[str, ModelDir] | None = None) -> Genome:
    """The genome of `space` (its `genome.kind`), over already open `models` when given."""
    module_name, _, class_name = GENOME_KINDS[space.genome.kind].genome.partition(":")
    genome_class = getattr(importlib.import_module(module_name), class_name)
    return genome_class(space, models)
