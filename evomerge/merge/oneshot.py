"""`evomerge merge`: a mergekit YAML file (one document or a mergekit-multi file) to a checkpoint.

Every document is planned and merged in order into staging folders; the final output is moved
into OUT_DIR only when every part is done. Intermediate merges (named documents) live under the
output's staging folder and are deleted after, or, with `intermediate_dir`, each goes to
`intermediate_dir/NAME` under the same rules as OUT_DIR. The data methods' statistics are cached
in the `data:` section's `cache_dir`, else in `.evomerge-stats` beside OUT_DIR (data_stats.for_plan):
nothing is written anywhere else.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from evomerge.config.mergekit_yaml import MergeConfig, dump_merge_config, load_merge_documents
from evomerge.data_stats.for_plan import attach_statistics, check_data, with_absolute_data
from evomerge.errors import EvomergeError
from evomerge.io.lora import folders_of
from evomerge.io.output_dir import check_target, refuse_protected, staged_output
from evomerge.merge.engine import MergeReport, describe_merge, verify_layout, write_checkpoint
from evomerge.merge.plan import MergePlan
from evomerge.merge.planner import plan_merge, resolve_model_source
from evomerge.preflight import plan_documents

PARTS_FOLDER = ".evomerge-parts"


def merge_file(
    config_path: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    max_shard_bytes: int = 5 * 10**9,
    workers: int | None = None,
    allow_pickle: bool = False,
    allow_crimes: bool = False,
    copy_tokenizer: bool = True,
    model_card: bool = True,
    overwrite: bool = False,
    intermediate_dir: Path | None = None,
    progress: bool = True,
) -> MergeReport:
    """Merge every document of `config_path`; the last (unnamed) one becomes `out_dir`."""
    config_path = Path(config_path)
    if workers is not None and workers < 1:
        raise EvomergeError(f"--workers: expected at least 1 tensor merged at a time, got {workers}")
    documents = load_merge_documents(config_path)
    if len(documents) > 1 and documents[-1].name:
        raise EvomergeError(
            f"{config_path}: the last document is named '{documents[-1].name}'; leave the final merge unnamed"
        )
    if len(documents) == 1 and documents[0].name:
        documents = [documents[0].model_copy(update={"name": None})]  # a lone document is the output
    protected: dict[str, list[Path]] = {"the merge config": [config_path]}
    if intermediate_dir is not None:
        protected["the intermediate directory"] = [Path(intermediate_dir)]
    # Every document planned (headers, shapes, parameters) before the first one is merged, so a
    # mistake in the last document does not surface after minutes of merging the first.
    plan_documents(documents, config_path=config_path, allow_pickle=allow_pickle, allow_crimes=allow_crimes)
    check_data(documents, config_path)
    documents = [with_absolute_data(document, config_path) for document in documents]
    named_parts = [d.name for d in documents[:-1]]
    sources = source_folders(documents, config_path, set(named_parts))
    refuse_protected(out_dir, {"a source model": sources})
    part_protected = {**protected, "the output directory": [Path(out_dir)], "a source model": sources}
    part_protected.pop("the intermediate directory", None)
    if intermediate_dir is not None:
        for name in named_parts:  # every part's folder is checked before any merging
            check_target(Path(intermediate_dir) / name, overwrite=overwrite, protected=part_protected)
    common = dict(
        device=device,
        max_shard_bytes=max_shard_bytes,
        workers=workers,
        allow_pickle=allow_pickle,
        copy_tokenizer_files=copy_tokenizer,
    )
    with staged_output(out_dir, overwrite=overwrite, protected=protected) as final:
        parts_root = final.staging / PARTS_FOLDER
        named: dict[str, Path] = {}
        all_paths: dict[str, Path] = {}
        methods: set[str] = set()
        for document in documents:
            plan = plan_merge(
                document,
                config_path=config_path,
                seed=seed,
                allow_pickle=allow_pickle,
                allow_crimes=allow_crimes,
                named_models=named,
            )
            plan, _ = attach_statistics(plan, document, config_path=config_path, out_dir=out_dir, device=device)
            all_paths.update({ref: path for ref, path in plan.models.items() if ref not in named})
            methods.update(plan.method_names)
            if document.name is None:
                report = write_checkpoint(plan, final.staging, progress=progress, **common)
            elif intermediate_dir is None:
                named[document.name] = parts_root / document.name
                write_checkpoint(plan, named[document.name], progress=progress, **common)
            else:
                named[document.name] = Path(intermediate_dir) / document.name
                _merge_part(
                    plan,
                    named[document.name],
                    overwrite=overwrite,
                    protected=part_protected,
                    progress=progress,
                    common=common,
                )
        shutil.rmtree(parts_root, ignore_errors=True)
        descriptions = {
            name: f"intermediate merge (document {named_parts.index(name) + 1} of the recipe)" for name in named
        }
        multi = len(documents) > 1
        describe_merge(
            plan,
            final.staging,
            final_dir=final.target,
            recipe_yaml="---\n".join(dump_merge_config(d) for d in documents) if multi else None,
            paths=all_paths,
            names=descriptions,
            multi_document=multi,
            methods=sorted(methods),
            write_card=model_card,
        )
        final.commit(verify=lambda directory: verify_layout(plan, directory))
    return replace(report, out_dir=Path(out_dir))


def source_folders(documents: Sequence[MergeConfig], config_path: Path, names: set[str]) -> list[Path]:
    """The local folders the documents read (names of intermediate merges and missing paths left
    out: the planner reports those), so no output can be written over its own inputs."""
    folders = []
    for document in documents:
        refs = document.referenced_models()
        if document.vocabulary_source() not in (None, "base", "union"):
            refs.append(document.vocabulary_source())
        for ref in refs:
            if ref in names:
                continue
            try:
                folders.extend(folders_of(resolve_model_source(ref, config_path.parent)))
            except (FileNotFoundError, EvomergeError):
                continue
    return list(dict.fromkeys(folders))


def _merge_part(
    plan: MergePlan, target: Path, *, overwrite: bool, protected: Mapping, progress: bool, common: dict
) -> None:
    """One named document into `intermediate_dir/NAME`, staged and swapped in like the output."""
    with staged_output(target, overwrite=overwrite, protected=protected) as part:
        write_checkpoint(plan, part.staging, progress=progress, **common)
        describe_merge(plan, part.staging, final_dir=part.target, write_card=False)
        part.commit(verify=lambda directory: verify_layout(plan, directory))
