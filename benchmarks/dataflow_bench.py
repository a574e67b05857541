"""Parameter-space vs data-flow-space search on the demo family; writes results/dataflow.md.

Three arms, same seed and trial budget, one in-process worker each, the eval settings of
search_spaces/demo.yml (no item limit):

- PS: the genome of search_spaces/demo.yml (per-group merge method and genes, merged in place);
- DFS: the genome of search_spaces/dataflow.yml (layer paths over the four fine-tunes);
- PS+DFS: that dataflow genome with the PS arm's best trial (highest mean search score) added to
  the slot pool through the genome's `trials:` field, when this build has it.

Per arm: best mean over the objectives (search split), hypervolume of the front (reference point 0,
as benchmarks/search_bench.py), complete/failed trials, depth of the best path (DFS arms), and the
median time per completed trial split into build (merge or path build), hash and lm-eval, with the
ratio of a DFS trial's wall to a PS trial's.

    .venv/bin/python benchmarks/dataflow_bench.py [--family demo_models] [--trials 30] [--out results/dataflow.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import cpu_model  # noqa: E402

from evomerge.config.space import SearchSpace, load_space  # noqa: E402
from evomerge.demo import DemoFamily, build_demo_family  # noqa: E402
from evomerge.genome.dataflow import DataflowGenomeSpec  # noqa: E402
from evomerge.search.pareto import hypervolume  # noqa: E402
from evomerge.search.runner import run_search  # noqa: E402
from evomerge.store.trial_store import TrialStore  # noqa: E402
from evomerge.workers.candidate import CandidateWorker  # noqa: E402

PS_SPACE = REPO / "search_spaces" / "demo.yml"
DFS_SPACE = REPO / "search_spaces" / "dataflow.yml"


@dataclass
class ArmResult:
    label: str
    sampler: str
    genes: int
    n_complete: int = 0
    n_failed: int = 0
    best_mean: float | None = None
    best_number: int | None = None
    best_depth: int | None = None
    hypervolume: float | None = None
    build_s: float | None = None
    hash_s: float | None = None
    eval_s: float | None = None
    wall_s: float | None = None
    seconds: float = 0.0
    note: str = ""
    storage: str = ""
    study: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def space_file(template: Path, family: DemoFamily, work: Path, *, study: str, seed: int, sampler: str | None) -> dict:
    """The template space as a dict, pointed at `family`, a study of its own in `work`, no finalists."""
    data = yaml.safe_load(template.read_text())
    data["models"] = [f"{skill}@{path}" for skill, path in family.finetunes.items()]
    data["base_model"] = f"base@{family.base}"
    data["eval"]["include_paths"] = [str(REPO / "tasks")]
    data["search"].update(
        {"seed": seed, "study_name": study, "storage": f"sqlite:///{work / f'{study}.db'}", "finalists": 0}
    )
    if sampler:
        data["search"]["sampler"] = sampler
    return data


def write_space(data: dict, work: Path, name: str) -> SearchSpace:
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_space(path)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_arm(label: str, space: SearchSpace, n_trials: int) -> ArmResult:
    """One study from scratch; the numbers the table shows."""
    worker = CandidateWorker(space)
    events: list[dict[str, Any]] = []
    started = time.perf_counter()
    summary = run_search(space, n_trials=n_trials, progress=False, worker=worker, on_trial=events.append)
    arm = ArmResult(
        label,
        space.search.sampler,
        len(worker.genome.distributions()),
        n_complete=summary.n_complete,
        n_failed=summary.n_failed,
        seconds=time.perf_counter() - started,
        storage=space.storage_url,
        study=space.study_name,
    )
    if not events:
        return arm
    best = max(events, key=lambda e: (sum(e["values"]) / len(e["values"]), -e["number"]))
    arm.best_mean = sum(best["values"]) / len(best["values"])
    arm.best_number = best["number"]
    directions = [o.direction for o in space.objectives]
    arm.hypervolume = hypervolume([e["values"] for e in events], directions, [0.0] * len(directions))
    arm.build_s = median([e["merge_seconds"] for e in events])
    arm.hash_s = median([e["hash_seconds"] for e in events])
    arm.eval_s = median([e["eval_seconds"] for e in events])
    arm.wall_s = median([e["wall_seconds"] for e in events])
    if hasattr(worker.genome, "path"):
        store = TrialStore(space.storage_url)
        try:
            genome = store.trial(space.study_name, best["number"]).genome
        finally:
            store.close()
        arm.best_depth = len(worker.genome.path(genome).steps)
    print(
        f"{label}: best mean {arm.best_mean:.3f} (trial {arm.best_number}), hv {arm.hypervolume:.4f}, "
        f"{arm.n_complete} complete / {arm.n_failed} failed, {arm.seconds:.0f}s",
        flush=True,
    )
    return arm


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_row(arm: ArmResult, ps_wall: float | None) -> str:
    if arm.note:
        return f"| {arm.label} | {arm.note} |" + " |" * 11
    ratio = arm.wall_s / ps_wall if arm.wall_s and ps_wall else None
    depth = "-" if arm.best_depth is None else str(arm.best_depth)
    return (
        f"| {arm.label} | {arm.sampler} | {arm.genes} | {fmt(arm.best_mean, '.3f')} | {fmt(arm.hypervolume, '.4f')} | "
        f"{arm.n_complete} / {arm.n_failed} | {depth} | {fmt(arm.build_s and arm.build_s * 1e3, '.1f')} | "
        f"{fmt(arm.hash_s and arm.hash_s * 1e3, '.1f')} | {fmt(arm.eval_s, '.3f')} | {fmt(arm.wall_s, '.3f')} | "
        f"{fmt(ratio, '.2f')} | {arm.seconds:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", type=Path, default=REPO / "demo_models", help="demo family (built if missing)")
    parser.add_argument("--trials", type=int, default=30, help="trial budget per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default=None, help="one sampler for every arm (default: each space file's)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "dataflow.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    family = build_demo_family(args.family, progress=False)
    work = Path(tempfile.mkdtemp(prefix="evomerge-dataflow-bench-"))
    common = {"seed": args.seed, "sampler": args.sampler}

    ps_space = write_space(space_file(PS_SPACE, family, work, study="ps", **common), work, "ps")
    ps = run_arm("PS", ps_space, args.trials)
    dfs_data = space_file(DFS_SPACE, family, work, study="dfs", **common)
    dfs = run_arm("DFS", write_space(dfs_data, work, "dfs"), args.trials)

    both = ArmResult("PS+DFS", "", 0)
    if "trials" not in DataflowGenomeSpec.model_fields:
        both.note = "PS+DFS: not available in this build"
    elif ps.best_number is None:
        both.note = "PS+DFS: the PS arm completed no trial"
    else:
        data = space_file(DFS_SPACE, family, work, study="psdfs", **common)
        data["genome"]["trials"] = [{"study": ps.study, "trial": ps.best_number, "storage": ps.storage}]
        if data["genome"].get("models"):  # a listed pool takes the PS trial only when named in it
            data["genome"]["models"] = [*data["genome"]["models"], f"{ps.study}#{ps.best_number}"]
        try:
            both = run_arm("PS+DFS", write_space(data, work, "psdfs"), args.trials)
        except Exception as error:  # the table says why, the other arms still count
            both.note = f"PS+DFS failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    print(both.note or "", flush=True)

    genome = yaml.safe_load(DFS_SPACE.read_text())["genome"]
    command = f"benchmarks/dataflow_bench.py --family {args.family} --trials {args.trials} --seed {args.seed}"
    if args.sampler:
        command += f" --sampler {args.sampler}"
    lines = [
        "# Parameter space vs data-flow space vs both (demo family)",
        "",
        f"Command: `.venv/bin/python {command}`  ",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores (shared with other jobs), "
        f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, "
        f"torch {torch.__version__}, Python {platform.python_version()}; {datetime.date.today().isoformat()}.",
        "",
        f"Each arm: a fresh study, seed {args.seed}, {args.trials} trials (failed ones count against the budget), "
        "one in-process worker, the four demo skills as objectives with `search_spaces/demo.yml`'s eval settings "
        "(whole search split, no item limit), no finalists. PS is `search_spaces/demo.yml`'s genome "
        f"(sampler {ps.sampler}); DFS is `search_spaces/dataflow.yml`'s (sampler {dfs.sampler}: "
        f"models {genome['models']}, repeats {genome['repeats']}, depth {genome['min_depth']}-{genome['max_depth']}, "
        f"use_rate {genome.get('use_rate', 0.5)}, scale {genome['scale']}); PS+DFS is DFS with the PS arm's best trial"
        f"{'' if ps.best_number is None else f' (trial {ps.best_number})'} in the slot pool (genome `trials:`).",
        "",
        "Best mean: the highest mean over the four objectives (search split) of a completed trial. Hypervolume: "
        "the 4-objective front of completed trials, reference point 0 (as `results/search.md`). Depth: steps of the "
        "best trial's path, fixed ends included. Times: medians over completed trials; build is the in-place merge "
        "(PS) or the path-model build (DFS), hash the weights hash, eval lm-eval, wall optuna ask to tell. "
        "Wall vs PS: a trial's median wall over the PS arm's.",
        "",
        "| arm | sampler | genes | best mean | hypervolume | complete / failed | best depth | build (ms) | "
        "hash (ms) | eval (s) | wall (s) | wall vs PS | arm total (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        table_row(ps, ps.wall_s),
        table_row(dfs, ps.wall_s),
        table_row(both, ps.wall_s),
        "",
        f"Total benchmark time {time.perf_counter() - started:.0f}s.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
