"""The resident sources of a layer path: model folders, and PS trials merged in memory (PS+DFS).

A dataflow space may list trials of a parameter-space study (`genome.trials`); each becomes a source
named `<study>#<trial>` whose merged layers join the slot pool. Such a trial is re-merged once per
process from the genome its study recorded, through the same in-place merge a PS worker scores
(`MergedCandidates`), and its weights hash must equal the recorded one: otherwise the PS study's
models changed and the layers would not be the ones that were scored. Workers and export both build
sources with `build_sources`, so the hash a dataflow trial records is the one export writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, EvomergeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from evomerge.config.space import SearchSpace
    from evomerge.io.model_dir import ModelDir


@dataclass(eq=False)
class TrialSource:
    """One completed trial of a PS study, as a source of a layer path."""

    name: str  # `<study>#<trial>`
    space: SearchSpace  # the PS study's space, as stored with the study
    genome: Any  # that space's genome (its models opened)
    trial: int
    params: dict[str, Any]  # the genome the study recorded for the trial
    weights_hash: str  # the hash recorded when the trial was scored
    device: str | None = None  # where it was scored (a merge on another kind of device may differ in the last bit)

    @property
    def donor(self) -> str:
        """The PS model whose config, class and layer layout the merged model has."""
        return self.genome.base or self.genome.finetunes[0]

    @property
    def donor_dir(self) -> ModelDir:
        return self.genome.models[self.donor]

    @property
    def donor_path(self) -> Path:
        return Path(self.genome.paths[self.donor])


def _storage_url(space: SearchSpace, storage: str | None) -> str:
    """`storage` resolved as `search.storage` is (None: this space's own study database)."""
    if storage is None:
        return space.storage_url
    search = space.search.model_copy(update={"storage": storage})
    return space.model_copy(update={"search": search}).storage_url


def _trial_number(study_space: SearchSpace, trial: int | str) -> int:
    if trial != "best":
        return int(trial)
    from evomerge.search.front import compute_front, pick_best
    from evomerge.store.trial_store import TrialStore

    with TrialStore(study_space.storage_url) as store:
        best = pick_best(study_space, compute_front(study_space, store))
    if best is None:
        raise EvomergeError(f"study '{study_space.study_name}' has no completed trial to pick as best")
    return best.number


def resolve_trial(space: SearchSpace, index: int, study: str, trial: int | str, storage: str | None) -> TrialSource:
    """`genome.trials[index]` checked: the study exists, the trial is complete with a genome and a hash."""
    from evomerge.genome.kinds import make_genome
    from evomerge.genome.protocol import builds_paths
    from evomerge.search.catalog import load_study_space
    from evomerge.store.states import TrialStatus
    from evomerge.store.trial_store import TrialStore

    try:
        study_space = load_study_space(study, _storage_url(space, storage))
        number = _trial_number(study_space, trial)
        with TrialStore(study_space.storage_url) as store:
            record = store.trial(study, number)
        if record is None:
            raise EvomergeError(f"study '{study}' has no trial {number}")
        if record.status != TrialStatus.COMPLETE:
            raise EvomergeError(f"trial {number} of study '{study}' is {record.status}, not complete")
        if not record.genome or not record.weights_hash:
            raise EvomergeError(f"trial {number} of study '{study}' has no recorded genome and weights hash")
        genome = make_genome(study_space)
        if builds_paths(genome):
            raise EvomergeError(f"study '{study}' is not a parameter-space study: only its merges can join a path")
    except EvomergeError as error:
        raise ConfigError(str(error), file=space.source_path, field=f"genome.trials.{index}") from None
    return TrialSource(
        f"{study}#{number}", study_space, genome, number, dict(record.genome), record.weights_hash, record.device
    )


def resolve_trials(space: SearchSpace) -> dict[str, TrialSource]:
    """Every `genome.trials` entry by source name, checked up front (one ConfigError each)."""
    sources: dict[str, TrialSource] = {}
    for index, ref in enumerate(space.genome.trials):
        source = resolve_trial(space, index, ref.study, ref.trial, ref.storage)
        if source.name in sources:
            raise ConfigError(f"{source.name} is listed twice", file=space.source_path, field=f"genome.trials.{index}")
        sources[source.name] = source
    return sources


def build_trial_model(source: TrialSource, *, dtype: torch.dtype, device: str) -> nn.Module:
    """The PS trial's merged model, resident and hash-checked (merged as its study's workers merged it)."""
    from evomerge.dtypes import torch_dtype
    from evomerge.workers.builders import MergedCandidates

    builder = MergedCandidates(source.genome, source.space, dtype=torch_dtype(source.space.dtype), device=device)
    candidate = builder.build(source.params)
    if candidate.weights_hash != source.weights_hash:
        where = (
            f" (or it was scored on {source.device}: run on the same kind of device)"
            if source.device and source.device.split(":")[0] != device.split(":")[0]
            else ""
        )
        raise EvomergeError(
            f"{source.name}: the re-merged weights hash {candidate.weights_hash} differs from the one its study recorded "
            f"({source.weights_hash}): the PS study's models changed{where}, so its layers are not the ones that were "
            "scored"
        )
    return candidate.model.to(dtype).eval()


def build_sources(genome: Any, names: Iterable[str], *, dtype: torch.dtype, device: str) -> dict[str, nn.Module]:
    """The resident source models of `names`: folders loaded once, PS trials merged once."""
    from evomerge.dataflow.path_model import load_sources

    names = list(dict.fromkeys(names))
    trials = getattr(genome, "trials", {})
    loaded = load_sources(
        {name: genome.paths[name] for name in names if name not in trials}, dtype=dtype, device=device
    )
    for name in names:
        if name in trials:
            loaded[name] = build_trial_model(trials[name], dtype=dtype, device=device)
    return {name: loaded[name] for name in names}
