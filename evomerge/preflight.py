"""Everything `run` needs, checked before any heavy work; shared by `validate` and `run_search`.

A search that starts and then fails every trial (an unknown task or metric, a storage URL that
does not open, a truncated or NaN-holding source model, a filter that matches nothing, a
sampler option the sampler does not take, an `eval.max_length` too short for the tasks'
answers, a fisher/regmean data task that is unknown or has no gold answer to score) costs the
user the model loading and often a database full of failed trials. Each of these is a one-line
error here instead, naming the file and field.

What "cheap" means for the NaN/Inf scan of the sources: every tensor is read once, so it runs
by default only while all source models together hold at most `SCAN_LIMIT_BYTES` (2 GB: a few
seconds from the page cache); `validate --scan` forces it, `--no-scan` skips it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.config.space import SearchSpace
from evomerge.errors import ConfigError, EvomergeError, first_line
from evomerge.io.lora import folders_of, open_model
from evomerge.io.model_dir import ModelDir
from evomerge.store.database import check_storage

SCAN_LIMIT_BYTES = 2 * 10**9
# TaskEvaluator passes these to lm-eval's HFLM itself; eval.model_args must not repeat them.
_HFLM_OWN_ARGS = ("pretrained", "tokenizer", "batch_size", "max_length", "device")


@dataclass
class PreflightReport:
    """What was checked, one line each (validate prints them), and the genome built on the way."""

    checks: list[str] = field(default_factory=list)
    genome: Any = None


def should_scan(total_bytes: int, scan: bool | None) -> bool:
    return scan if scan is not None else total_bytes <= SCAN_LIMIT_BYTES


def scan_models(
    models: Mapping[str, ModelDir], scan: bool | None, *, fields: Mapping[str, str] | None = None, file: object = None
) -> str:
    """NaN/Inf in any source tensor is an error naming the model and tensor; returns the check's line."""
    total = sum(model.total_bytes for model in models.values())
    if not should_scan(total, scan):
        return f"NaN/Inf scan skipped ({total / 1e9:.1f} GB of sources > {SCAN_LIMIT_BYTES / 1e9:.0f} GB; --scan forces it)"
    for name, model in models.items():
        bad = model.find_non_finite()
        if bad is not None:
            raise ConfigError(
                f"{model.path}: tensor {bad} holds NaN or Inf; every merge with this model would too",
                file=file,
                field=(fields or {}).get(name),
            )
    return f"NaN/Inf scan: {len(models)} models, {total / 1e6:.1f} MB, all finite"


def check_filters(space: SearchSpace, tensor_names: Iterable[str]) -> None:
    """Every genome filter must match at least one tensor name, or its genes would do nothing."""
    names = list(tensor_names)
    for index, substring in enumerate(getattr(space.genome, "filters", ())):  # a kind may have no filters
        if not substring or not any(substring in name for name in names):
            example = next(iter(names), "")
            raise ConfigError(
                f"filter '{substring}' matches no tensor of the models (names look like '{example}')",
                file=space.source_path,
                field=f"genome.filters.{index}",
            )


def check_device(space: SearchSpace) -> str:
    """`device: cuda[:N]` needs that CUDA device on this machine (the driver's; Ray workers check their own)."""
    from evomerge.devices import DEVICE_FORMS, resolve_device

    try:
        resolve_device(space.device, on_this_machine=False)
    except EvomergeError:  # a --device override skips the space file's own check
        raise ConfigError(
            f"expected {DEVICE_FORMS}, got {space.device!r}", file=space.source_path, field="device"
        ) from None
    if space.ray.address or space.search.workers > 1:
        return f"device {space.device}"
    try:
        resolve_device(space.device)
    except EvomergeError:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        have = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise ConfigError(
            f"{space.device} is not on this machine ({have}); use cpu or auto", file=space.source_path, field="device"
        ) from None
    return f"device {space.device}"


def check_eval_args(space: SearchSpace) -> None:
    for name in space.eval.model_args:
        if name in _HFLM_OWN_ARGS:
            raise ConfigError(
                f"'{name}' is set by evomerge (use eval.{name} where there is one)",
                file=space.source_path,
                field=f"eval.model_args.{name}",
            )


def check_tokenizer(space: SearchSpace, genome: Any, fields: Mapping[str, str]) -> str:
    """The donor's tokenizer loads: every worker reads every candidate with it (the output
    vocabulary's instead when the space merges vocabularies; that one is built with the genome)."""
    from evomerge.io.lora import model_folder
    from evomerge.workers.builders import donor_name

    if getattr(genome, "vocab", None) is not None:
        return "tokenizer: the output vocabulary's, built from every model's"
    name = donor_name(genome)
    folder = model_folder(genome.paths[name])  # an adapter's: its base
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(folder, trust_remote_code=space.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = first_line(exc, 120)
        raise ConfigError(
            f"{folder} has no tokenizer that loads ({first}); every candidate is scored with '{name}''s tokenizer",
            file=space.source_path,
            field=fields.get(name),
        ) from None
    return f"tokenizer: {name}'s loads"


def preflight_space(space: SearchSpace, *, scan: bool | None = None, genome: Any = None) -> PreflightReport:
    """Check everything a search of `space` needs, in the order a user can fix them; no device work."""
    from evomerge.data_stats.for_space import check_space_data
    from evomerge.evaluate.factory import evaluator_kind
    from evomerge.genome.kinds import make_genome
    from evomerge.genome.protocol import builds_paths
    from evomerge.merge.structure import check_in_memory
    from evomerge.search.samplers import make_sampler

    report = PreflightReport()
    spec = space.search  # options against the sampler's signature, and it builds
    make_sampler(spec.sampler, seed=spec.seed, options=spec.sampler_options, source=space.source_path)
    report.checks.append(f"sampler {space.search.sampler}: options accepted")
    evaluator = evaluator_kind(space)
    check_eval_args(space)
    report.checks.append(check_device(space))
    try:
        report.checks.append(f"storage: {check_storage(space.storage_url)}")
    except EvomergeError as exc:
        raise ConfigError(str(exc), file=space.source_path, field="search.storage") from None
    genome = genome or make_genome(space)  # opens every model: headers, sizes, names, shapes, grouping
    report.genome = genome
    report.checks.append(
        f"models: {len(genome.models)} compatible, every tensor header read and inside its file; {genome.outline()}"
    )
    donor = genome.base or genome.finetunes[0]
    check_filters(space, genome.models[donor].tensors)
    from evomerge.moe.genome import builds_moe

    if builds_moe(genome):  # each trial builds a MoE checkpoint: what every build would refuse
        report.checks.append(genome.check())
    elif not builds_paths(genome):  # candidates are merged into one loaded model of the donor's class
        report.checks.append(check_in_memory(genome.models[donor], remote_code=space.trust_remote_code))
    fields = {m.name: f"models.{i}" for i, m in enumerate(space.models)}
    if space.base_model:
        fields[space.base_model.name] = "base_model"
    report.checks.append(scan_models(genome.models, scan, fields=fields, file=space.source_path))
    report.checks.append(check_tokenizer(space, genome, fields))
    report.checks.append(evaluator.check(space, genome.paths[donor]))
    data_line = check_space_data(space, genome.paths)  # fisher/regmean: what each worker computes at its start
    if data_line is not None:
        report.checks.append(data_line)
    estimator = space.eval.estimator
    if estimator is not None:
        report.checks.append(
            f"estimator {estimator.kind}: {estimator.method} from up to {estimator.anchors} anchor items per task, "
            f"calibrated on the references and {estimator.calibration} merges; the front re-scored on every item"
        )
    return report


@dataclass
class PlannedModel:
    """What a named document of a mergekit-multi file will produce, for planning the documents
    after it before anything is merged: its tensors' names, shapes and dtype come from its plan."""

    path: Path
    tensors: dict[str, Any]
    architecture: str
    num_hidden_layers: int
    config: dict[str, Any]

    @classmethod
    def from_plan(cls, name: str, plan: Any, donor: ModelDir | Any) -> PlannedModel:
        from evomerge.io.model_dir import TensorInfo

        tensors = {r.name: TensorInfo(tuple(r.shape), plan.out_dtype, f"{name}.safetensors") for r in plan.tensors}
        config = {**donor.config, "num_hidden_layers": plan.num_hidden_layers}
        return cls(Path(f"<part {name}>"), tensors, donor.architecture, plan.num_hidden_layers, config)


def plan_documents(documents: list[Any], *, config_path: Path, allow_pickle: bool, allow_crimes: bool) -> list[Any]:
    """Plan every document of a (multi-)merge file in order; named parts stand in for their outputs."""
    from evomerge.merge.planner import Planner

    planned: dict[str, Any] = {}
    plans = []
    for document in documents:
        planner = Planner(
            document, config_path=config_path, allow_pickle=allow_pickle, allow_crimes=allow_crimes, model_dirs=planned
        )
        plan = planner.plan()
        plans.append(plan)
        if document.name:
            planned[document.name] = PlannedModel.from_plan(document.name, plan, planner.models[plan.config_donor])
    return plans


def preflight_merge(
    plans: list[Any], *, scan: bool | None = None, allow_pickle: bool = False, file: object = None
) -> PreflightReport:
    """Planned merges (the documents of one file): the planner read the headers; scan each source once for NaN/Inf."""
    sources = {
        str(source): source
        for plan in plans
        for source in plan.models.values()
        if all(folder.is_dir() for folder in folders_of(source))
    }  # not the planned parts
    models = {name: open_model(sources[name], allow_pickle=allow_pickle) for name in sorted(sources)}
    report = PreflightReport()
    report.checks.append(scan_models(models, scan, file=file))
    return report
