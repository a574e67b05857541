"""Export a scored trial as a Hugging Face checkpoint plus its mergekit YAML and a model card.

The genome recorded for the trial is decoded into the same MergePlan, merged to disk, and the
written weights are hashed: the hash must equal the one recorded when the trial was scored
(bit-identical, DARE masks included), otherwise the export fails instead of shipping a model
nobody measured.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from evomerge.config.space import SearchSpace
from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import write_model_card
from evomerge.merge.engine import run_merge
from evomerge.merge.resident import checkpoint_hash
from evomerge.search.genome import Genome
from evomerge.search.runner import compute_front, pick_best
from evomerge.store import display_url
from evomerge.store.trial_store import TrialStore


@dataclass(frozen=True)
class ExportReport:
    out_dir: Path
    trial: int
    weights_hash: str
    verified: bool
    seconds: float


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
    store = TrialStore(space.storage_url)
    if trial is None:
        best = pick_best(space, compute_front(space, store))
        if best is None:
            raise EvomergeError(f"study '{space.study_name}' has no completed trial to export yet")
        trial = best.number
    record = store.trial(space.study_name, trial)
    if record is None:
        raise EvomergeError(f"study '{space.study_name}' has no trial {trial}")
    if record.status != "complete":
        raise EvomergeError(f"trial {trial} is {record.status}" + (f" ({record.failure})" if record.failure else "") + "; pick a completed trial")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise EvomergeError(f"{out_dir}: not empty; pass --overwrite or choose another directory")
        shutil.rmtree(out_dir)
    genome = Genome(space)
    plan = genome.plan(record.genome, metadata={"study": space.study_name, "trial": str(trial), "storage": display_url(space.storage_url)})
    report = run_merge(plan, out_dir, device=device, max_shard_bytes=max_shard_bytes, progress=progress, write_card=False)
    names = [r.name for r in plan.tensors]
    digest = checkpoint_hash(out_dir, names) if verify else ""
    if verify and digest != record.weights_hash:
        where = f" It was scored on {record.device}; export with --device set to the same kind of device." if record.device and not record.device.startswith("cpu") else ""
        raise EvomergeError(
            f"exported weights hash {digest} differs from the hash recorded for trial {trial} ({record.weights_hash}): "
            f"the checkpoint in {out_dir} is not the model that was scored.{where}"
        )
    scores = {}
    for split in ("search", "selection"):
        for task, metrics in store.scores(space.study_name, split).get(trial, {}).items():
            scores[f"{task} ({split})"] = {m: v for m, v in metrics.items() if "stderr" not in m}
    write_model_card(
        out_dir,
        methods=plan.method_names,
        models=plan.models,
        base_model=genome.base,
        recipe_yaml=plan.recipe_yaml,
        seed=plan.seed,
        scores=scores,
        provenance={
            "study": space.study_name,
            "trial": str(trial),
            "weights hash (xxh3-128)": record.weights_hash or "",
            "scored on": record.device or "",
            "storage": display_url(space.storage_url),
        },
    )
    return ExportReport(out_dir, trial, digest, verify, report.seconds)
