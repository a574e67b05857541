"""Trials per hour on the demo: one worker under each thread setting, then 1 and 2 Ray workers.

Same space (search_spaces/demo.yml, random sampler so sampling cost is flat, no finalist
re-scoring), same trial count for every configuration. Throughput is measured over the search
loop (first trial started to last trial told); start-up (loading sources, model and tasks, plus
a warm-up trial that scores the references) is reported apart. Every configuration runs in a
fresh child process, because OpenMP reads its wait policy once, when torch is loaded:

- in process, OpenMP default: torch imported before evomerge with no OMP_WAIT_POLICY (what a
  single worker got before evomerge set the policy itself), one thread per core;
- in process, passive, 1 thread / one per core / one per idle core (evomerge's default: the cores
  the 1-minute load average leaves idle when the worker starts);
- 1 and 2 Ray actors: 1 CPU and 1 thread each, passive waiting (the actors' runtime_env).

The ratios are against the fastest single-worker setting, so "2 workers" says what a second
worker adds over the best one can do with one. The 1-minute load average around each run is
recorded: on a shared machine the same code is much slower, and that is part of the result.
Writes results/scaling.md.

    .venv/bin/python benchmarks/scaling_bench.py [--trials 24] [--rounds 2] [--demo-dir demo_models]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CORES = str(os.cpu_count() or 1)
# name -> (label, workers, kind, environment changes)
CONFIGS = {
    "inprocess-default": (
        "1 worker, in process, OpenMP default wait, 1 thread per core (before)",
        1,
        "inprocess-torch-first",
        {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": CORES},
    ),
    "inprocess-passive-1": (
        "1 worker, in process, passive wait, 1 thread",
        1,
        "inprocess",
        {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
    ),
    "inprocess-passive-all": (
        "1 worker, in process, passive wait, 1 thread per core",
        1,
        "inprocess",
        {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": CORES},
    ),
    "inprocess-passive-idle": (
        "1 worker, in process, passive wait, 1 thread per idle core (now the default)",
        1,
        "inprocess",
        {},
    ),
    "ray-1": ("1 worker, Ray actor (1 CPU, passive)", 1, "ray", {"OMP_WAIT_POLICY": "PASSIVE"}),
    "ray-2": ("2 workers, Ray actors (1 CPU each, passive)", 2, "ray", {"OMP_WAIT_POLICY": "PASSIVE"}),
}
SINGLE = ("inprocess-default", "inprocess-passive-1", "inprocess-passive-all", "inprocess-passive-idle", "ray-1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs of every configuration, the order reversed each round"
    )
    parser.add_argument(
        "--demo-dir", type=Path, default=REPO / "demo_models", help="the demo family (built if missing)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "scaling.md")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # child mode: run one configuration, print JSON
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.trials, args.demo_dir, args.work)), flush=True)
        return

    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for round_number in range(args.rounds):
        order = list(CONFIGS) if round_number % 2 == 0 else list(reversed(CONFIGS))
        for name in order:
            work = Path(tempfile.mkdtemp(prefix="evomerge-scaling-"))
            env = _child_env(CONFIGS[name][3])
            command = [
                sys.executable,
                __file__,
                "--only",
                name,
                "--trials",
                str(args.trials),
                "--demo-dir",
                str(args.demo_dir.resolve()),
                "--work",
                str(work),
            ]
            load_before = os.getloadavg()[0]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            load_after = os.getloadavg()[0]
            shutil.rmtree(work, ignore_errors=True)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result.update(name=name, load=(load_before, load_after))
            runs[name].append(result)
            print(
                f"round {round_number + 1}, {CONFIGS[name][0]}: {result['trials']} trials in {result['loop']:.1f}s = "
                f"{result['trials'] / result['loop'] * 3600:.0f} trials/hour (start-up {result['startup']:.1f}s, "
                f"load {load_before:.1f} -> {load_after:.1f})",
                flush=True,
            )
    args.out.write_text(_report(runs, args.trials, args.rounds))
    print(f"wrote {args.out}")


def _child_env(changes: dict) -> dict:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    env.pop("OMP_NUM_THREADS", None)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def measure(name: str, trials: int, demo_dir: Path, work: Path) -> dict:
    label, workers, kind, _ = CONFIGS[name]
    if kind == "inprocess-torch-first":
        import torch  # noqa: F401  (before evomerge: OpenMP starts with its default wait policy)
    import psutil
    import torch

    from evomerge.config.space import load_space
    from evomerge.demo import build_demo_family
    from evomerge.search.runner import run_search
    from evomerge.workers.pool import RayPool, make_pool

    build_demo_family(demo_dir, progress=False)
    space_file = work / f"{name}.yml"
    text = (REPO / "search_spaces" / "demo.yml").read_text()
    space_file.write_text(text.replace("../demo_models/", f"{demo_dir}/").replace("../tasks", str(REPO / "tasks")))
    base = load_space(space_file)
    search = base.search.model_copy(
        update={
            "sampler": "random",
            "storage": f"sqlite:///{work / (name + '.db')}",
            "study_name": name,
            "finalists": 0,
            "workers": workers,
            "enqueue": [],
        }
    )
    space = base.model_copy(update={"search": search, "device": "cpu"})
    started = time.perf_counter()
    pool = make_pool(space) if kind.startswith("inprocess") else RayPool(space, workers)
    startup = time.perf_counter() - started
    warm = time.perf_counter()
    run_search(space, n_trials=1, pool=pool, progress=False)  # scores the references (5 models)
    warmup = time.perf_counter() - warm
    loop_start = time.perf_counter()
    run_search(space, n_trials=trials + 1, pool=pool, progress=False)
    loop = time.perf_counter() - loop_start
    if kind.startswith("inprocess"):
        memory = [(label, psutil.Process().memory_info().rss, pool.worker.sources.nbytes)]
        threads = torch.get_num_threads()
    else:
        memory = [(f"{label}: {info['name']}", info["rss"], info["sources_bytes"]) for info in pool.worker_infos]
        threads = 1
    pool.close()
    return {
        "label": label,
        "workers": workers,
        "trials": trials,
        "loop": loop,
        "startup": startup + warmup,
        "threads": threads,
        "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "memory": memory,
        "torch": torch.__version__,
    }


def _report(runs: dict[str, list[dict]], trials: int, rounds: int) -> str:
    # A configuration's rate: all its trials over all its loop time (the mean over the rounds).
    rate = {name: sum(r["trials"] for r in rs) / sum(r["loop"] for r in rs) for name, rs in runs.items()}
    best_single = max(SINGLE, key=lambda n: rate[n])
    baseline = rate[best_single]
    loads = [load for rs in runs.values() for r in rs for load in r["load"]]
    lines = [
        "# Scaling: trials per hour on the demo, by thread setting and worker count",
        "",
        f"Space `search_spaces/demo.yml` with the random sampler, {trials} trials per run after a warm-up trial "
        "(references scored), SQLite storage, no finalist re-scoring, each run in a fresh process. Throughput over "
        "the search loop; start-up = loading sources + model + tasks in every worker, plus the warm-up.",
        "",
        "**Measured on a loaded machine**: 2 cores shared with four other engineers' test runs at the time. The load "
        "column is the 1-minute load average before and after each run (2.0 means both cores busy); it moved between "
        f"{min(loads):.1f} and {max(loads):.1f}. Absolute rates are therefore far below an idle machine's and noisy. "
        f"To spread the load's drift over the configurations, every one ran {rounds} time(s), in the opposite order "
        "each round; a rate is all its trials over all its loop time.",
        "",
        "| configuration | workers | torch threads (each round) | OMP_WAIT_POLICY | s / trial (each round) | trials / hour | "
        "vs best single worker | start-up (s) | load (each round) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        first = rs[0]
        mark = " **(baseline)**" if name == best_single else ""
        lines.append(
            f"| {first['label']}{mark} | {first['workers']} | {', '.join(str(r['threads']) for r in rs)} | "
            f"{first['wait_policy']} | "
            + ", ".join(f"{r['loop'] / r['trials']:.2f}" for r in rs)
            + f" | {rate[name] * 3600:.0f} | {rate[name] / baseline:.2f}x | "
            + ", ".join(f"{r['startup']:.0f}" for r in rs)
            + " | "
            + ", ".join(f"{r['load'][0]:.1f}-{r['load'][1]:.1f}" for r in rs)
            + " |"
        )
    every_core, old, default = rate["inprocess-passive-all"], rate["inprocess-default"], rate["inprocess-passive-idle"]
    one_thread, ray_one, two = rate["inprocess-passive-1"], rate["ray-1"], rate["ray-2"]
    lines += [
        "",
        "What the ratios mean:",
        f'- The baseline is the fastest way found to run one worker ({CONFIGS[best_single][0]}); "vs best single '
        "worker\" divides each configuration's throughput by it. So the 2-worker row says what a second worker adds "
        "over one worker at its best, not over a badly configured one.",
        f"- Passive waiting against OpenMP's default, same in-process worker and thread count: {every_core / old:.1f}x "
        f"the throughput (a trial takes 1/{every_core / old:.0f} of the time). With the default policy each idle "
        "OpenMP thread spins before it sleeps; on cores that other processes also want, the spinning takes the time "
        "the working thread needs. evomerge now sets OMP_WAIT_POLICY=PASSIVE before torch loads (evomerge/threads.py).",
        f"- Thread count, all passive, in process: one per core {every_core / baseline:.2f}x, one {one_thread / baseline:.2f}x, "
        f"one per idle core (the default) {default / baseline:.2f}x; a single Ray actor with one CPU {ray_one / baseline:.2f}x. "
        + (
            "Here one thread beat one per core: on a loaded machine a thread that waits for a busy core holds up "
            "the others at every parallel step. "
            if one_thread > every_core
            else "Here one per core beat one thread. "
        )
        + "The default takes the cores the load average leaves idle when the worker starts: all of them on an "
        "idle machine.",
        f"- Against what a single in-process worker got before (OpenMP's default wait, one thread per core), the "
        f"default now runs {default / old:.1f}x the trials per hour on this machine.",
        f"- 2 Ray workers: {two / baseline:.2f}x the best single worker, {two / ray_one:.2f}x one Ray actor. On 2 "
        "cores the ceiling is 2x, and here the other processes on the machine take part of both cores, so this is "
        "what a second worker adds to this search's share of the machine.",
        "",
        "## Worker resident memory vs the sources (first round)",
        "",
        "| worker | resident set (MiB) | resident sources (MiB) |",
        "|---|---|---|",
    ]
    for rs in runs.values():
        for label, rss, sources in rs[0]["memory"]:
            lines.append(f"| {label} | {rss / 2**20:.0f} | {sources / 2**20:.1f} |")
    torch_version = next(iter(runs.values()))[0]["torch"]
    lines += [
        "",
        "The demo sources are tiny (five models); a worker's resident set is dominated by the Python, torch, "
        "transformers and lm-eval runtime (~0.5 GB), and grows by the sources' size: `ResidentSources` holds every "
        "source tensor once in the math dtype, plus one model for the candidate.",
        "",
        f"Command: `.venv/bin/python benchmarks/scaling_bench.py --trials {trials} --rounds {rounds}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU, torch {torch_version}; "
        f"{datetime.date.today().isoformat()}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
