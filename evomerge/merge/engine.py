"""Execute a MergePlan: stream it to a checkpoint on disk, tensor by tensor.

Each output tensor is computed from its source tensors (read lazily from memory-mapped files)
and written at its precomputed offset, by a small thread pool (torch and safetensors release the
GIL). At most `2 x workers` tensors per source are alive at any time, so peak memory does not
grow with model size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from evomerge.dtypes import dtype_name
from evomerge.errors import EvomergeError, NonFiniteMergeError
from evomerge.io.checkpoint import (
    copy_tokenizer,
    describe_sources,
    hub_ids,
    relocate_recipe,
    write_config,
    write_model_card,
    write_recipe,
)
from evomerge.io.lora import AdapterModel, folders_of, model_folder, open_model
from evomerge.io.model_dir import ModelDir
from evomerge.io.output_dir import check_free_space, staged_output
from evomerge.io.safetensors_io import StreamingCheckpointWriter
from evomerge.merge.methods import DeltaCache, get_method, merge_tensors
from evomerge.merge.plan import MergePlan, TensorRecipe
from evomerge.merge.seeds import tensor_seed
from evomerge.merge.vocab import write_tokenizer
from evomerge.progress import progress_bar


@dataclass(frozen=True)
class MergeReport:
    out_dir: Path
    num_tensors: int
    output_bytes: int
    seconds: float
    shards: int


def open_sources(plan: MergePlan, *, allow_pickle: bool = False) -> dict[str, ModelDir | AdapterModel]:
    return {ref: open_model(source, allow_pickle=allow_pickle) for ref, source in plan.models.items()}


def plan_folders(plan: MergePlan) -> list[Path]:
    """Every folder the plan reads (an adapter's and its base's): no output may overwrite one."""
    return [folder for source in plan.models.values() for folder in folders_of(source)]


def compute_recipe(
    recipe: TensorRecipe,
    source_tensors: Sequence[torch.Tensor],
    *,
    math_dtype: torch.dtype | None,
    seed: int,
    out: torch.Tensor | None = None,
    cache: DeltaCache | None = None,
    statistics: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """One output tensor from its (already loaded) source tensors; pure math, any device.

    With `out` (see merge_tensors) the result is written there instead of a new tensor; `cache`
    (resident sources only) keeps delta statistics keyed by the recipe's (model, tensor) inputs."""
    if math_dtype is not None:
        source_tensors = [t.to(math_dtype) for t in source_tensors]
    elif recipe.base_index is not None:
        base_dtype = source_tensors[recipe.base_index].dtype
        source_tensors = [t.to(base_dtype) for t in source_tensors]
    return merge_tensors(
        recipe.method,
        source_tensors,
        recipe.model_params,
        recipe.global_params,
        recipe.base_index,
        seed=tensor_seed(seed, recipe.name),
        out=out,
        cache=cache,
        cache_keys=recipe.inputs,
        statistics=statistics,
    )


def align_inputs(plan: MergePlan, recipe: TensorRecipe, tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """The source tensors as the merge method sees them: an embedding or output head of a merge
    with an output vocabulary has its rows put in output-token order first (merge/vocab.py), in
    the math dtype (mergekit casts before it aligns, so means are taken in that dtype)."""
    vocab = plan.vocab
    if vocab is None or recipe.name not in vocab.tensors:
        return tensors
    if plan.math_dtype is not None:
        tensors = [t.to(plan.math_dtype) for t in tensors]
    return vocab.align([ref for ref, _ in recipe.inputs], tensors, vocab.tensors[recipe.name])


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in a tensor. min/max propagate NaN, so one aminmax pass decides it,
    where isfinite(t).all() builds a full-size bool tensor first."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def open_statistics(plan: MergePlan) -> dict[str, object]:
    """The plan's statistics files (data methods), opened lazily like the sources."""
    from safetensors import safe_open

    return {ref: safe_open(str(path), framework="pt", device="cpu") for ref, path in plan.statistics.items()}


def recipe_statistics(
    recipe: TensorRecipe, statistics: Mapping[str, object], device: torch.device
) -> list[torch.Tensor | None] | None:
    """The per-input statistics a data method's recipe needs (None per input that has none)."""
    if get_method(recipe.method).statistic is None:
        return None
    found = []
    for index, (ref, name) in enumerate(recipe.inputs):
        opened = statistics.get(ref) if index != recipe.base_index else None
        has = opened is not None and name in opened.keys()  # noqa: SIM118 (safe_open has no __contains__)
        found.append(opened.get_tensor(name).to(device) if has else None)
    return found


def _load(
    plan: MergePlan, sources: Mapping[str, ModelDir], recipe: TensorRecipe, device: torch.device
) -> Sequence[torch.Tensor]:
    return align_inputs(plan, recipe, [sources[ref].get(name).to(device) for ref, name in recipe.inputs])


@contextmanager
def torch_threads(count: int):
    """Set torch's (process-wide) intra-op thread count for the duration of a block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run_merge(
    plan: MergePlan,
    out_dir: Path,
    *,
    device: str = "cpu",
    max_shard_bytes: int = 5 * 10**9,
    workers: int | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
    copy_tokenizer_files: bool = True,
    write_card: bool = True,
    sources: Mapping[str, ModelDir] | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Merge `plan` into a Hugging Face checkpoint at `out_dir` (out of core).

    The checkpoint is written beside `out_dir` and moved into place only once complete and
    verified; `overwrite` replaces an earlier evomerge output there, never anything else."""
    with staged_output(out_dir, overwrite=overwrite, protected={"a source model": plan_folders(plan)}) as staged:
        report = write_checkpoint(
            plan,
            staged.staging,
            device=device,
            max_shard_bytes=max_shard_bytes,
            workers=workers,
            progress=progress,
            allow_pickle=allow_pickle,
            copy_tokenizer_files=copy_tokenizer_files,
            sources=sources,
        )
        describe_merge(plan, staged.staging, final_dir=staged.target, write_card=write_card)
        staged.commit(verify=lambda directory: verify_layout(plan, directory))
    return replace(report, out_dir=Path(out_dir))


def describe_merge(
    plan: MergePlan,
    out_dir: Path,
    *,
    final_dir: Path,
    recipe_yaml: str | None = None,
    paths: Mapping[str, Path] | None = None,
    names: Mapping[str, str] | None = None,
    multi_document: bool = False,
    methods: Sequence[str] | None = None,
    write_card: bool = True,
) -> None:
    """The recipe (model paths relative to `final_dir`) and, optionally, the model card.

    `recipe_yaml` and `paths` (reference -> checkpoint folder) default to the plan's own; `names`
    maps the intermediate merges of a multi-document recipe to what they are."""
    sources = dict(plan.models if paths is None else paths)
    recipe = relocate_recipe(
        plan.recipe_yaml if recipe_yaml is None else recipe_yaml, final_dir=final_dir, paths=sources, names=names or {}
    )
    if recipe:
        write_recipe(out_dir, recipe)
    if write_card:
        bases = {r.inputs[r.base_index][0] for r in plan.tensors if r.base_index is not None}
        write_model_card(
            out_dir,
            methods=plan.method_names if methods is None else methods,
            sources=describe_sources(
                {**sources, **{name: Path(name) for name in names or {}}}, final_dir=final_dir, names=names or {}
            ),
            base_model_ids=hub_ids(sources.values()),
            base_model=next(iter(bases)) if len(bases) == 1 else None,
            recipe_yaml=recipe,
            multi_document=multi_document,
            seed=plan.seed,
            provenance=plan.metadata,
        )


def verify_layout(plan: MergePlan, directory: Path) -> None:
    """The written checkpoint holds exactly the plan's tensors, with their shapes and dtype."""
    written = ModelDir(directory)
    try:
        expected = {r.name: (tuple(r.shape), plan.out_dtype) for r in plan.tensors}
        found = {name: (tuple(info.shape), info.dtype) for name, info in written.tensors.items()}
    finally:
        written.close()
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()))[:3]
        raise EvomergeError(
            f"{directory}: the written checkpoint does not match the plan (e.g. {wrong}); nothing was replaced"
        )


def write_checkpoint(
    plan: MergePlan,
    out_dir: Path,
    *,
    device: str = "cpu",
    max_shard_bytes: int = 5 * 10**9,
    workers: int | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
    copy_tokenizer_files: bool = True,
    sources: Mapping[str, ModelDir] | None = None,
) -> MergeReport:
    """Merge `plan` into the folder `out_dir`, which the caller owns (a staging folder): the
    weights, config.json and the tokenizer; the recipe and card are the caller's (they name
    paths relative to the final folder)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_free_space(out_dir, plan.output_bytes())
    sources = sources or open_sources(plan, allow_pickle=allow_pickle)
    math_device = torch.device(device)
    workers = workers or default_workers()
    statistics = open_statistics(plan)
    layout = [(recipe.name, recipe.shape, plan.out_dtype) for recipe in plan.tensors]
    writer = StreamingCheckpointWriter(out_dir, layout, max_shard_bytes=max_shard_bytes)

    def produce(recipe: TensorRecipe) -> None:
        merged = compute_recipe(
            recipe,
            _load(plan, sources, recipe, math_device),
            math_dtype=plan.math_dtype,
            seed=plan.seed,
            statistics=recipe_statistics(recipe, statistics, math_device),
        )
        if not all_finite(merged):
            raise NonFiniteMergeError(
                f"{recipe.name}: the merge produced NaN or Inf values (check the weights, and the sources for NaN/Inf)"
            )
        writer.write(recipe.name, merged.to(plan.out_dtype))

    intra_threads = max(1, (os.cpu_count() or 1) // workers)
    try:
        with (
            progress_bar(len(plan.tensors), "merging", enabled=progress, unit="tensors") as bar,
            torch_threads(intra_threads),
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evomerge-merge") as pool,
        ):
            pending: set[Future] = set()
            for recipe in plan.tensors:
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
                        bar.advance()
                pending.add(pool.submit(produce, recipe))
            for future in pending:
                future.result()
                bar.advance()
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    donor_dir = model_folder(plan.models[plan.config_donor])
    write_config(
        donor_dir,
        out_dir,
        dtype_name=dtype_name(plan.out_dtype),
        num_hidden_layers=plan.num_hidden_layers,
        vocab_size=plan.vocab.size if plan.vocab else None,
        layer_origins=plan.layer_origins,
    )
    if plan.vocab is not None:  # mergekit writes the built tokenizer whatever copy_tokenizer says
        donor = plan.models.get(plan.vocab.generation_donor) if copy_tokenizer_files else None
        write_tokenizer(plan.vocab, out_dir, model_folder(donor) if donor is not None else None)
    elif copy_tokenizer_files:
        copy_tokenizer(model_folder(plan.models[plan.tokenizer_donor]), out_dir)
    return MergeReport(
        out_dir=out_dir,
        num_tensors=len(plan.tensors),
        output_bytes=plan.output_bytes(),
        seconds=time.perf_counter() - started,
        shards=len(shards),
    )
