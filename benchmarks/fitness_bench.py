"""Cheap fitness on the demo family: items and wall time to reach a full-fidelity search's best.

The first arm is a full-fidelity search (`search_spaces/demo.yml`'s settings, no finalists): its
best full-set mean over `--trials` trials is the target. Every other arm runs the same space and
seed with its own `eval` settings until a trial with a full-set score reaches that target and it
has run at least `--trials` trials (or `--max-trials` / `--arm-timeout` stop it), and the table
says what it took to get there. An arm is one `Arm` entry in ARMS: a label and what it changes
in the space's `eval` section.

Items are counted where they are scored: a counting wrapper around each worker's search
evaluator adds up the doc ids of every call (every item of every task when a call names none),
the reference models' scoring included (the same for every arm). An arm's `on_trial` values must
be full-set scores for a trial to count as reaching the target (pruned trials never do).

    .venv/bin/python benchmarks/fitness_bench.py [--trials 40] [--out results/fitness.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import machine_line, write_section  # noqa: E402

from evomerge.config.space import SearchSpace, load_space  # noqa: E402
from evomerge.demo import DemoFamily, build_demo_family  # noqa: E402
from evomerge.evaluate.protocol import ItemEvaluator  # noqa: E402
from evomerge.search.runner import run_search  # noqa: E402
from evomerge.workers.candidate import CandidateWorker  # noqa: E402

TEMPLATE = REPO / "search_spaces" / "demo.yml"
SECTION = "fidelity"  # this script's part of results/fitness.md
TITLE = "# Cheap fitness: measurements (demo family)"


@dataclass(frozen=True)
class Arm:
    label: str
    eval_settings: dict[str, Any] = field(default_factory=dict)  # merged into the space's `eval`
    # Its trials report estimates: it runs exactly `--trials` trials and reaches the target only
    # through the front it re-scores on every item at the end (all of its items and time counted).
    estimated: bool = False


HALVING = {"rungs": [10, 30, "all"], "eta": 3}
ARMS = [
    Arm("full fidelity", {}),
    Arm("successive halving 10/30/100, eta 3, promote by Pareto rank", {"fidelity": HALVING}),
    Arm("successive halving 10/30/100, eta 3, promote by mean", {"fidelity": HALVING | {"promote_by": "weighted"}}),
    Arm(
        "successive halving 10/30/100, eta 4, promote by mean",
        {"fidelity": {"rungs": [10, 30, "all"], "eta": 4, "promote_by": "weighted"}},
    ),
    Arm(
        "successive halving 10/100, eta 4, promote by mean",
        {"fidelity": {"rungs": [10, "all"], "eta": 4, "promote_by": "weighted"}},
    ),
    Arm(
        "successive halving 5/20/100, eta 4, promote by mean",
        {"fidelity": {"rungs": [5, 20, "all"], "eta": 4, "promote_by": "weighted"}},
    ),
    Arm(
        "IRT estimator, 20 anchors per task, 10 calibration merges (gp-IRT)",
        {"estimator": {"kind": "irt", "anchors": 20, "calibration": 10, "method": "gp_irt"}},
        estimated=True,
    ),
]


class CountingEvaluator:
    """Delegates to an evaluator and counts the items each call scores."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.items = 0

    def _count(self, items) -> None:
        if items is None:
            if not isinstance(self.inner, ItemEvaluator):
                raise TypeError("cannot count the items of an evaluator without item_ids()")
            items = self.inner.item_ids()
        self.items += sum(len(ids) for ids in items.values())

    def evaluate(self, model, items=None):
        self._count(items)
        return self.inner.evaluate(model, items)

    def evaluate_items(self, model, items=None):
        self._count(items)
        return self.inner.evaluate_items(model, items)

    def item_ids(self):
        return self.inner.item_ids()


@dataclass
class ArmResult:
    label: str
    trials: int = 0  # finished trials when the arm stopped
    pruned: int = 0
    best_mean: float = -math.inf  # best full-set mean when the arm stopped
    items: int = 0  # every item the arm scored
    reference_items: int = 0  # of which the reference models (base and parents, every item)
    seconds: float = 0.0
    reached_trial: int | None = None  # how many finished trials it took to first reach the target
    reached_items: int | None = None
    reached_seconds: float | None = None
    first_best: tuple[int, int, float] | None = None  # (trials, items, seconds) when its own best first appeared


class Stop(Exception):
    """Raised from on_trial once an arm has what it needs."""


def space_for(arm: Arm, family: DemoFamily, work: Path, *, seed: int, index: int) -> SearchSpace:
    data = yaml.safe_load(TEMPLATE.read_text())
    data["models"] = [f"{skill}@{path}" for skill, path in family.finetunes.items()]
    data["base_model"] = f"base@{family.base}"
    data["device"] = "cpu"
    data["eval"]["include_paths"] = [str(REPO / "tasks")]
    data["eval"].update(arm.eval_settings)
    for objective in data["objectives"]:  # no finalists: the held-out tasks would only cost the references time
        objective.pop("selection_task", None)
    study = f"arm{index}"
    data["search"].update(
        {"seed": seed, "study_name": study, "storage": f"sqlite:///{work / f'{study}.db'}", "finalists": 0}
    )
    path = work / f"{study}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_space(path)


def run_arm(
    arm: Arm, space: SearchSpace, *, trials: int, max_trials: int, timeout: float, target: float | None
) -> ArmResult:
    """One fresh study. Without a target (the first arm): exactly `trials` trials. With one: until a
    trial reaches it and `trials` have finished, or `max_trials` / `timeout`."""
    worker = CandidateWorker(space)
    counter = CountingEvaluator(worker.search_evaluator)
    worker.search_evaluator = counter
    result = ArmResult(arm.label)
    started = time.perf_counter()

    def on_trial(event: dict[str, Any]) -> None:
        result.trials += 1
        result.pruned += bool(event.get("pruned"))
        now = (result.trials, counter.items, time.perf_counter() - started)
        if arm.estimated:
            return
        if not event.get("pruned"):
            mean = sum(event["values"]) / len(event["values"])
            if mean > result.best_mean:
                result.best_mean, result.first_best = mean, now
            if target is not None and result.reached_trial is None and mean >= target - 1e-9:
                result.reached_trial, result.reached_items, result.reached_seconds = now
        if target is not None and result.reached_trial is not None and result.trials >= trials:
            raise Stop
        if time.perf_counter() - started > timeout:
            raise Stop

    summary = None
    try:
        summary = run_search(
            space,
            n_trials=trials if target is None or arm.estimated else max_trials,
            progress=False,
            worker=worker,
            on_trial=on_trial,
        )
    except Stop:
        pass
    result.items, result.seconds = counter.items, time.perf_counter() - started
    if arm.estimated and summary is not None and summary.front:  # the front holds full-set values by now
        result.best_mean = max(row.mean() for row in summary.front)
        result.first_best = (result.trials, result.items, result.seconds)
        if target is not None and result.best_mean >= target - 1e-9:
            result.reached_trial, result.reached_items, result.reached_seconds = result.first_best
    full_set = sum(len(ids) for ids in counter.item_ids().values())
    result.reference_items = (len(worker.genome.finetunes) + (1 if worker.genome.base else 0)) * full_set
    if target is None and result.first_best is not None:
        result.reached_trial, result.reached_items, result.reached_seconds = result.first_best
    print(
        f"{arm.label}: best {result.best_mean:.4f}, {result.trials} trials ({result.pruned} stopped low), "
        f"{result.items} items, {result.seconds:.0f}s; reached at trial {result.reached_trial}, "
        f"items {result.reached_items}, {result.reached_seconds and round(result.reached_seconds)}s",
        flush=True,
    )
    return result


def row(result: ArmResult, reference: ArmResult, target: float) -> str:
    def ratio(value, base):
        return "-" if value is None or not base else f"{value / base:.2f}"

    reached = result.reached_trial is not None
    trial_items = result.reached_items - result.reference_items if reached else None
    reference_trial_items = reference.reached_items - reference.reference_items
    noise = math.sqrt(max(result.best_mean * (1 - result.best_mean), 0.0) / 400)  # 4 tasks x 100 items, binomial
    return (
        f"| {result.label} | {'yes' if reached else 'no'} | {result.reached_trial or '-'} | "
        f"{result.reached_items if reached else '-'} | {ratio(result.reached_items, reference.reached_items)} | "
        f"{trial_items if reached else '-'} | {ratio(trial_items, reference_trial_items)} | "
        f"{f'{result.reached_seconds:.0f}' if reached else '-'} | {ratio(result.reached_seconds, reference.reached_seconds)} | "
        f"{result.best_mean:.4f} ± {noise:.3f} | {result.trials} ({result.pruned}) | {result.items} | {result.seconds:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=Path, default=REPO / "demo_models", help="demo family (built if missing)")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument(
        "--max-trials", type=int, default=120, help="a later arm stops here if it never reaches the target"
    )
    parser.add_argument("--arm-timeout", type=float, default=300.0, help="seconds after which a later arm stops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "fitness.md")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    family = build_demo_family(args.family, progress=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        spaces = [space_for(arm, family, work, seed=args.seed, index=i) for i, arm in enumerate(ARMS)]
        reference = run_arm(
            ARMS[0], spaces[0], trials=args.trials, max_trials=args.trials, timeout=math.inf, target=None
        )
        target = reference.best_mean
        results = [reference]
        for arm, space in zip(ARMS[1:], spaces[1:], strict=True):
            results.append(
                run_arm(
                    arm, space, trials=args.trials, max_trials=args.max_trials, timeout=args.arm_timeout, target=target
                )
            )
    command = (
        f"benchmarks/fitness_bench.py --family {args.family} --trials {args.trials} "
        f"--max-trials {args.max_trials} --arm-timeout {args.arm_timeout:g} --seed {args.seed}"
    )
    body = "\n".join(
        [
            "## Full fidelity vs successive halving vs the IRT estimator: items to reach the full search's best",
            "",
            f"Command: `.venv/bin/python {command}`  ",
            f"{machine_line(torch)}; {datetime.date.today().isoformat()}.",
            "",
            f"Every arm: a fresh study of `search_spaces/demo.yml` (TPE over the four skills, parents and the uniform "
            f"mix enqueued first, all 100 items per task), seed {args.seed}, one in-process worker, no finalists; only "
            "the `eval` settings differ. Target: the best full-set mean (over the four objectives) that the "
            f"full-fidelity arm reaches in {args.trials} trials ({target:.4f}). A later arm runs until one of its "
            f"full-set trials reaches the target and {args.trials} trials have finished (at most {args.max_trials} "
            f"trials or {args.arm_timeout:g}s). Items: every doc id scored, all tasks, the five reference models' "
            "400 each included (trials' items: without them); for the full arm, 'to reach' is where its own best "
            "first appeared. Wall: from the "
            "search's start (references included, model loading not). The ± is the binomial standard error of a "
            "mean over 400 items. Promotion by Pareto rank (the default for a multi-objective study) versus by "
            "the mean (`promote_by: weighted`): with the four skills as objectives each parent alone is on a "
            "rung's Pareto front, since it wins its own skill. Wall times depend on what else the shared machine "
            "runs while each arm runs; the item counts do not.",
            "",
            "| arm | reached | trials to reach | items to reach | items vs full | trials' items to reach | "
            "trials' items vs full | wall to reach (s) | wall vs full | final best mean | trials (stopped low) | "
            "items, whole arm | wall, whole arm (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *[row(result, reference, target) for result in results],
            "",
            f"Total benchmark time {time.perf_counter() - started:.0f}s.",
        ]
    )
    write_section(args.out, SECTION, body, title=TITLE)
    print(body)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
