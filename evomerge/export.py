"""Export a scored trial as a Hugging Face checkpoint plus its mergekit YAML and a model card.

The genome recorded for the trial is decoded into the same MergePlan, merged into a staging
folder beside OUT_DIR, and the written weights are hashed: the hash must equal the one recorded
when the trial was scored (bit-identical, DARE masks included), otherwise the export fails
instead of shipping a model nobody measured, and whatever OUT_DIR held before is left as it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.config.space import SearchSpace
from evomerge.errors import EvomergeError
from evomerge.genome.kinds import make_genome
from evomerge.genome.protocol import Genome, builds_paths
from evomerge.io.checkpoint import describe_sources, hub_ids, relocate_recipe, write_model_card, write_recipe
from evomerge.io.hashing import checkpoint_hash
from evomerge.io.lora import folders_of
from evomerge.io.model_dir import ModelDir
from evomerge.io.output_dir import staged_output
from evomerge.merge.engine import verify_layout, write_checkpoint
from evomerge.moe.genome import builds_moe
from evomerge.search.front import compute_front, pick_best
from evomerge.store import display_url
from evomerge.store.states import TrialStatus
from evomerge.store.trial_store import TrialStore

# lm-eval result keys that are bookkeeping, not scores.
_BOOKKEEPING = ("stderr", "sample_len", "sample_count", "alias", "samples", "n-shot", "higher_is_better")


@dataclass(frozen=True)
class Written:
    """What one genome kind wrote into the staging folder, for the hash check, the recipe and the card."""

    digest: str  # the written weights' hash ("" when not verified)
    recipe_yaml: str  # before its model paths are made relative to the output folder
    models: Mapping[str, Path]  # the sources by name
    methods: Sequence[str]
    seed: int | None
    verify_layout: Callable[[Path], None]  # raises when a folder does not hold exactly these tensors


def _write_merge(
    genome: Genome,
    params: Mapping[str, Any],
    staging: Path,
    metadata: Mapping[str, str],
    device: str,
    max_shard_bytes: int,
    verify: bool,
    progress: bool,
) -> Written:
    """A parameters genome: its merge plan, merged into `staging`."""
    getattr(genome, "load_statistics", lambda device: None)(device)  # fisher/regmean: from the search's cache
    plan = genome.plan(params, metadata=metadata)
    write_checkpoint(plan, staging, device=device, max_shard_bytes=max_shard_bytes, progress=progress)
    digest = checkpoint_hash(staging, [r.name for r in plan.tensors]) if verify else ""
    return Written(
        digest, plan.recipe_yaml, plan.models, plan.method_names, plan.seed, lambda d: verify_layout(plan, d)
    )


def _write_path(
    genome: Any,
    params: Mapping[str, Any],
    staging: Path,
    metadata: Mapping[str, str],
    device: str,
    max_shard_bytes: int,
    verify: bool,
    progress: bool,
) -> Written:
    """A dataflow genome: its layer path's layers copied in order, the step scales folded in (export_path)."""
    from transformers.utils import logging as transformers_logging

    from evomerge.dataflow.export import export_path, path_state_dict
    from evomerge.dataflow.sources import build_sources
    from evomerge.dtypes import torch_dtype

    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per source; the export line is enough
    path = genome.path(params)
    models = {name: Path(genome.paths[name]) for name in path.models if name in genome.paths}  # PS trials: no folder
    sources = build_sources(genome, path.models, dtype=torch_dtype(genome.space.dtype), device=device)
    digest = export_path(path, sources, staging, tokenizer_dir=Path(genome.paths[path.embed_from]))
    tensors = path_state_dict(path, sources)
    expected = {name: (tuple(tensors.source_tensor(name).shape), tensors.source_tensor(name).dtype) for name in tensors}

    def check(directory: Path) -> None:
        found = torch_layout(directory)
        if found != expected:
            wrong = sorted(set(found.items()) ^ set(expected.items()), key=str)[:3]
            raise EvomergeError(
                f"{directory}: the written checkpoint does not match the layer path (e.g. {wrong}); nothing was replaced"
            )

    recipe = genome.to_yaml(params, folds=tensors.folds)
    return Written(digest if verify else "", recipe, models, ["passthrough"], None, check)


def _write_moe(
    genome: Any,
    params: Mapping[str, Any],
    staging: Path,
    metadata: Mapping[str, str],
    device: str,
    max_shard_bytes: int,
    verify: bool,
    progress: bool,
) -> Written:
    """A moe genome: the trial's mergekit-moe YAML, assembled into `staging` as `evomerge moe` does."""
    from evomerge.moe.genome import write_candidate

    written = write_candidate(genome, params, staging, progress=progress)
    digest = checkpoint_hash(staging, written.tensors) if verify else ""
    models = {name: Path(genome.paths[name]) for name in [genome.base, *genome.chosen(params)]}

    def check(directory: Path) -> None:
        found = {name: shape for name, (shape, _) in torch_layout(directory).items()}
        if found != written.tensors:
            raise EvomergeError(f"{directory}: the written checkpoint does not match the MoE; nothing was replaced")

    return Written(digest, genome.to_yaml(params), models, ["moe"], None, check)


def torch_layout(directory: Path) -> dict[str, tuple[tuple[int, ...], Any]]:
    """A checkpoint folder's tensors: name -> (shape, torch dtype)."""
    written = ModelDir(directory)
    try:
        return {name: (tuple(info.shape), info.dtype) for name, info in written.tensors.items()}
    finally:
        written.close()


@dataclass(frozen=True)
class ExportReport:
    out_dir: Path
    trial: int
    weights_hash: str
    verified: bool
    seconds: float


def reported_metric(name: str, value: object) -> bool:
    """A score worth a row in the card: a number, and not one of lm-eval's bookkeeping entries."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not any(word in name.split(",")[0] for word in _BOOKKEEPING)


def score_table(
    merge: Mapping[str, Mapping[str, Mapping[str, float]]],
    parents: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
) -> tuple[list[str], list[tuple[str, str, list[float | None]]]]:
    """Card rows: each metric of the merge (split -> task -> metric -> value) beside the parents'.

    Returns the column names (`this merge`, then the parents) and (task, metric, values) rows;
    None where a model was not scored (held-out tasks are scored for the finalists only)."""
    columns = ["this merge", *sorted({name for split in parents.values() for name in split})]
    keys: dict[tuple[str, str, str], None] = {}  # (split, task, metric): the merge's first, then the parents'
    for split, tasks in merge.items():
        keys.update(
            {
                (split, task, metric): None
                for task, metrics in tasks.items()
                for metric, value in metrics.items()
                if reported_metric(metric, value)
            }
        )
    for split, by_parent in parents.items():
        for tasks in by_parent.values():
            keys.update(
                {
                    (split, task, metric): None
                    for task, metrics in tasks.items()
                    for metric, value in metrics.items()
                    if reported_metric(metric, value)
                }
            )
    rows = []
    for split, task, metric in keys:
        values = [merge.get(split, {}).get(task, {}).get(metric)]
        values += [parents.get(split, {}).get(name, {}).get(task, {}).get(metric) for name in columns[1:]]
        rows.append((task if split == "search" else f"{task} (held-out)", metric, values))
    return columns, rows


def _protected(space: SearchSpace) -> dict[str, Sequence[Path]]:
    """What an export folder must never hold: the space file, the study database, the sources."""
    protected: dict[str, Sequence[Path]] = {}
    if space.source_path:
        protected["the space file"] = [Path(space.source_path)]
    from sqlalchemy.engine import make_url

    url = make_url(space.storage_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        protected["the study database"] = [Path(url.database)]
    models = [*space.models, *([space.base_model] if space.base_model else [])]
    protected["a source model"] = [folder for m in models for folder in folders_of(m.source)]
    return protected


def _how_chosen(space: SearchSpace, chosen_by_user: bool) -> str:
    if chosen_by_user:
        return "picked by the user (--trial)"
    if any(o.selection_task for o in space.objectives) and space.search.finalists:
        return (
            f"the Pareto front's best {space.search.finalists} by weighted search score were re-scored on the held-out "
            "selection tasks; this one had the best weighted held-out score"
        )
    return "the Pareto front member with the best weighted search score"


def export_trial(
    space: SearchSpace,
    out_dir: Path,
    *,
    trial: int | None = None,
    device: str = "cpu",
    max_shard_bytes: int = 5 * 10**9,
    verify: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportReport:
    started = time.perf_counter()
    with TrialStore(space.storage_url) as store:
        chosen_by_user = trial is not None
        if trial is None:
            best = pick_best(space, compute_front(space, store))
            if best is None:
                raise EvomergeError(f"study '{space.study_name}' has no completed trial to export yet")
            trial = best.number
        record = store.trial(space.study_name, trial)
        if record is None:
            raise EvomergeError(f"study '{space.study_name}' has no trial {trial}")
        if record.status != TrialStatus.COMPLETE:
            raise EvomergeError(
                f"trial {trial} is {record.status}"
                + (f" ({record.failure})" if record.failure else "")
                + "; pick a completed trial"
            )
        with staged_output(out_dir, overwrite=overwrite, protected=_protected(space)) as staged:
            genome = make_genome(space)
            metadata = {"study": space.study_name, "trial": str(trial), "storage": display_url(space.storage_url)}
            write = _write_path if builds_paths(genome) else _write_moe if builds_moe(genome) else _write_merge
            written = write(genome, record.genome, staged.staging, metadata, device, max_shard_bytes, verify, progress)
            digest = written.digest
            if verify and digest != record.weights_hash:
                where = (
                    f" It was scored on {record.device}; export with --device set to the same kind of device."
                    if record.device and not record.device.startswith("cpu")
                    else ""
                )
                raise EvomergeError(
                    f"exported weights hash {digest} differs from the hash recorded for trial {trial} ({record.weights_hash}): "
                    f"it is not the model that was scored, so {out_dir} was left as it was.{where}"
                )
            recipe = relocate_recipe(written.recipe_yaml, final_dir=staged.target, paths=written.models)
            write_recipe(staged.staging, recipe)
            merge_scores = {
                split: store.scores(space.study_name, split).get(trial, {}) for split in ("search", "selection")
            }
            parent_scores = {split: store.references(space.study_name, split) for split in ("search", "selection")}
            columns, rows = score_table(merge_scores, parent_scores)
            complete = len(store.trials(space.study_name, status=TrialStatus.COMPLETE))
            failed = len(store.trials(space.study_name, status=TrialStatus.FAILED))
            write_model_card(
                staged.staging,
                methods=written.methods,
                sources=describe_sources(written.models, final_dir=staged.target, names={}),
                base_model=genome.base,
                base_model_ids=hub_ids(written.models.values()),
                recipe_yaml=recipe,
                multi_document=recipe.count("\n---\n") > 0,
                seed=written.seed,
                score_columns=columns,
                score_rows=rows,
                search={
                    "sampler": f"{space.search.sampler} (seed {space.search.seed})",
                    "trials": f"{complete} complete, {failed} failed"
                    + (f" (budget {space.search.n_trials})" if space.search.n_trials else ""),
                    "objectives": ", ".join(f"{o.label} ({o.direction})" for o in space.objectives),
                    "how this trial was chosen": _how_chosen(space, chosen_by_user),
                },
                provenance={
                    "study": space.study_name,
                    "trial": str(trial),
                    "weights hash (xxh3-128)": record.weights_hash or "",
                    "scored on": record.device or "",
                    "storage": display_url(space.storage_url),
                },
            )
            staged.commit(verify=written.verify_layout)
        return ExportReport(Path(out_dir), trial, digest, verify, time.perf_counter() - started)
