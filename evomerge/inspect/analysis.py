"""Read a model family tensor by tensor and sum its task-vector statistics per group.

Memory holds one tensor's entries per model at a time (a sample of a big tensor, see
`sampling`), so a 7B family takes about as long as reading 64K entries of each of its tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import CompatibilityError, EvomergeError
from evomerge.inspect.defaults import DEFAULT_DENSITIES
from evomerge.inspect.groups import KIND_ORDER, default_group_size, layer_group_names, tensor_kind
from evomerge.inspect.sampling import EntryReader, Sampling
from evomerge.inspect.vectors import PairStats, PairSums, pair_stats, tensor_sums
from evomerge.io.model_dir import ModelDir
from evomerge.merge.layout import split_layers


@dataclass(frozen=True)
class GroupStats:
    name: str  # "layers 0-7", "embeddings", "attn.q", "overall", ...
    stats: PairStats


@dataclass(frozen=True)
class Inspection:
    """Task-vector statistics of fine-tunes against their base: overall, per layer group, per tensor kind."""

    base: str
    models: tuple[str, ...]
    overall: PairStats
    layer_groups: tuple[GroupStats, ...]  # embeddings, layer groups in order, head
    kinds: tuple[GroupStats, ...]  # in KIND_ORDER
    num_layers: int
    group_size: int  # layers per layer group
    sampling: Sampling
    skipped: tuple[str, ...]  # tensors left out (not floating point)
    seconds: float

    @property
    def densities(self) -> tuple[float, ...]:
        return self.overall.densities


def _check_same_tensors(base: ModelDir, name: str, model: ModelDir) -> None:
    missing = sorted(set(base.tensors) - set(model.tensors))
    extra = sorted(set(model.tensors) - set(base.tensors))
    if missing or extra:
        what = f"lacks {missing[:3]}" if missing else f"has {extra[:3]}"
        raise CompatibilityError(
            f"{model.path}: model '{name}' {what}{' ...' if len(missing or extra) > 3 else ''} "
            f"that the base {base.path} {'has' if missing else 'does not'} (different architectures?)"
        )
    for tensor, info in base.tensors.items():
        if model.tensors[tensor].shape != info.shape:
            raise CompatibilityError(
                f"{model.path}: tensor {tensor} has shape {list(model.tensors[tensor].shape)}, "
                f"the base's is {list(info.shape)} (different model sizes?)"
            )


def _tensor(
    reader: EntryReader,
    base: ModelDir,
    models: list[ModelDir],
    name: str,
    sampling: Sampling,
    densities: tuple[float, ...],
) -> PairSums:
    """One tensor's sums: the same entries of the base and each model (all, or the sample)."""
    numel = torch.Size(base.tensors[name].shape).numel()
    spans = sampling.spans(name, numel)
    base_entries = reader.read(base, name, spans)
    deltas = torch.stack([reader.read(model, name, spans) - base_entries for model in models])
    scale = numel / base_entries.numel() if base_entries.numel() else 0.0
    return tensor_sums(base_entries, deltas, densities, scale=scale, numel=numel)


def inspect_models(
    base: tuple[str, Path],
    models: Sequence[tuple[str, Path]],
    *,
    sampling: Sampling | None = None,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    group_size: int | None = None,
    allow_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Inspection:
    """The statistics of each model's task vector (model - base), read lazily tensor by tensor.

    `sampling`: which entries to read (default `Sampling()`: 65,536 per tensor). `group_size`:
    layers per layer group (default: about four groups). `progress(done, total)` is called after
    each tensor.
    """
    if not models:
        raise EvomergeError("inspect needs at least one model besides the base")
    densities = tuple(float(d) for d in densities)
    if not densities or any(not 0 < d <= 1 for d in densities):
        raise EvomergeError(f"densities must lie in (0, 1], got {list(densities)}")
    sampling = sampling or Sampling()
    started = time.perf_counter()
    base_dir = ModelDir(base[1], allow_pickle=allow_pickle)
    model_dirs = [ModelDir(path, allow_pickle=allow_pickle) for _, path in models]
    try:
        for (name, _), model in zip(models, model_dirs):
            _check_same_tensors(base_dir, name, model)
        layout = split_layers(base_dir.tensors, source=str(base_dir.path))
        size = group_size or default_group_size(layout.num_layers)
        groups = layer_group_names(layout, size)
        names = [n for n in base_dir.tensors if base_dir.tensors[n].dtype.is_floating_point]
        skipped = tuple(n for n in base_dir.tensors if n not in names)
        empty = PairSums.zeros(len(models), len(densities))
        overall, by_group, by_kind = empty, {}, {}
        with EntryReader() as reader:
            for done, name in enumerate(names, 1):
                sums = _tensor(reader, base_dir, model_dirs, name, sampling, densities)
                overall = overall + sums
                group, kind = groups[name], tensor_kind(name)
                by_group[group] = by_group.get(group, empty) + sums
                by_kind[kind] = by_kind.get(kind, empty) + sums
                if progress:
                    progress(done, len(names))
    finally:
        for model in (base_dir, *model_dirs):
            model.close()
    group_order = dict.fromkeys(groups.values())  # embeddings, then the layer groups in order, then the head
    return Inspection(
        base=base[0],
        models=tuple(name for name, _ in models),
        overall=pair_stats(overall, densities),
        layer_groups=tuple(GroupStats(g, pair_stats(by_group[g], densities)) for g in group_order if g in by_group),
        kinds=tuple(GroupStats(k, pair_stats(by_kind[k], densities)) for k in KIND_ORDER if k in by_kind),
        num_layers=layout.num_layers,
        group_size=size,
        sampling=sampling,
        skipped=skipped,
        seconds=time.perf_counter() - started,
    )


def inspect_file(path: Path, **options) -> Inspection:
    """`inspect_models` on the base and models a space file or a merge YAML names; `group_size`
    defaults to the space genome's layer_granularity."""
    from evomerge.inspect.sources import family_from_file

    family = family_from_file(path)
    options.setdefault("group_size", family.group_size)
    options.setdefault("allow_pickle", family.allow_pickle)
    return inspect_models(family.base, family.models, **options)
