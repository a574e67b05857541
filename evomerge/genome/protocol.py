"""What the search loop, the workers, preflight and export use of a genome."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from evomerge.config.space import SearchSpace
    from evomerge.io.model_dir import ModelDir
    from evomerge.merge.plan import MergePlan


class Genome(Protocol):
    space: SearchSpace
    base: str | None  # the base model's name (None: no base)
    finetunes: list[str]  # the fine-tunes' names, in space order
    paths: dict[str, Path]  # every model's folder by name
    models: dict[str, ModelDir]  # every model, open (headers read)

    def distributions(self) -> dict[str, Any]:
        """optuna distributions of every gene, in a stable order (the study's search space)."""
        ...

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an optuna trial for every gene."""
        ...

    def parent_params(self, model: str) -> dict[str, Any] | None:
        """Genes that reproduce one fine-tune alone (None: the space cannot express it)."""
        ...

    def uniform_params(self) -> dict[str, Any] | None:
        """Genes of the plain average of the fine-tunes (None: not expressible)."""
        ...

    def plan(
        self, params: Mapping[str, Any], *, seed: int | None = None, metadata: Mapping[str, Any] | None = None
    ) -> MergePlan:
        """The merge plan of one trial's genes."""
        ...

    def to_yaml(self, params: Mapping[str, Any]) -> str:
        """A mergekit YAML that reproduces the plan of `params`."""
        ...

    def describe(self, params: Mapping[str, Any]) -> str:
        """One line for the dashboard: what the trial merges how ("layers 0-3 ties, ...")."""
        ...

    def outline(self) -> str:
        """One line for `validate`: the size of the search ("40 genes over 4 layer groups")."""
        ...


def builds_paths(genome: Any) -> bool:
    """A genome whose candidates are layer paths (`path(params)`, the dataflow kind), not merge plans."""
    return callable(getattr(genome, "path", None))
