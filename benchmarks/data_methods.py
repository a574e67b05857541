"""Fisher and RegMean against task arithmetic and TIES on the demo family; statistics time and memory.

Statistics (each fine-tune's diagonal Fisher and linear-layer Gram matrices) come from its own
skill's search split (`demo_<skill>`, at most `--examples` documents; the split holds 100), each
computed in a fresh process so its peak resident memory is its own. Every merge is an
`evomerge merge` of a mergekit-style YAML (the data methods' with a `data:` section that hits the
statistics just computed) and is scored on the held-out selection split (`demo_<skill>_select`,
100 items per skill): the table gives accuracy per skill and the mean. Task arithmetic and TIES
are shown at the best setting of a small uniform grid (every row of the grid is listed below the
table); Fisher and RegMean at their defaults (floor 1e-6; alpha 0.1) and RegMean at two more alphas.

    .venv/bin/python benchmarks/data_methods.py [--examples 256] [--out results/data_methods.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import yaml  # noqa: E402
from report import machine_line, write_section  # noqa: E402

SECTION = "data_methods"
TITLE = "# Data-based and alignment methods"
TASKS = (REPO / "tasks").resolve()
TA_WEIGHTS = (0.25, 0.5, 0.75, 1.0)  # task_arithmetic: the same weight for every fine-tune
TIES_GRID = [(density, lam) for density in (0.3, 0.6) for lam in (0.5, 1.0, 1.5)]  # ties: density, lambda
REGMEAN_ALPHAS = (0.1, 0.5, 0.9)
BREAK = "  "  # a markdown line break


def statistics_worker(kind: str, model_dir: str, task: str, cache: str, examples: int) -> None:
    """One statistic in this (fresh) process; prints seconds and peak memory as JSON."""
    import lm_eval  # noqa: F401  (imported before measuring: the libraries are not the statistic's)
    import transformers  # noqa: F401

    from evomerge.data_stats.cache import StatisticsRequest, ensure_statistics

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    request = StatisticsRequest(kind, Path(model_dir), (task,), (TASKS,), examples, 0)
    result = ensure_statistics(request, Path(cache))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = result.path.stat().st_size
    from safetensors.torch import load_file

    # How much weight the model carries: Fisher, the sum of every entry; Gram, the sum of the traces.
    stats = load_file(result.path)
    total = sum(
        float(t.double().sum() if kind == "fisher" else torch.diagonal(t).double().sum()) for t in stats.values()
    )
    measured = {"seconds": result.seconds, "before": before, "peak": peak, "bytes": size, "total": total}
    print(json.dumps({**measured, "computed": result.computed}))


def run_statistics(kind: str, model_dir: Path, task: str, cache: Path, examples: int) -> dict:
    argv = [sys.executable, __file__, "--worker", kind, str(model_dir), task, str(cache), str(examples)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, check=True, env=env, timeout=1800)
    return json.loads(done.stdout.strip().splitlines()[-1])


def merge_config(family, method: str, *, weight=None, density=None, params=None, data=None) -> dict:
    models = []
    for skill in family.skills:
        entry = {"model": str(family.finetunes[skill])}
        per_model = {k: v for k, v in (("weight", weight), ("density", density)) if v is not None}
        if per_model:
            entry["parameters"] = per_model
        models.append(entry)
    config = {"merge_method": method, "models": models, "dtype": "float32"}
    if method != "linear":  # linear would weigh a listed base in
        config["base_model"] = str(family.base)
    if params:
        config["parameters"] = params
    if data:
        config["data"] = data
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=256, help="examples per model (the split holds 100)")
    parser.add_argument(
        "--family", type=Path, default=REPO / "demo_models", help="demo family folder (built if missing)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "data_methods.md")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, model_dir, task, cache, examples = args.worker
        statistics_worker(kind, model_dir, task, cache, int(examples))
        return
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.demo import build_demo_family
    from evomerge.evaluate import TaskEvaluator
    from evomerge.merge.oneshot import merge_file

    family = build_demo_family(args.family, seed=0, progress=True)
    work = Path(tempfile.mkdtemp(prefix="evomerge-data-methods-"))
    cache = work / "stats"
    stats_rows = []
    for kind in ("fisher", "gram"):
        for skill in family.skills:
            measured = run_statistics(kind, family.finetunes[skill], f"demo_{skill}", cache, args.examples)
            stats_rows.append((kind, skill, measured))
            print(kind, skill, measured, flush=True)
    data = {
        "tasks": {str(family.finetunes[s]): [f"demo_{s}"] for s in family.skills},
        "include_paths": [str(TASKS)],
        "examples": args.examples,
        "seed": 0,
        "cache_dir": str(cache),
    }
    candidates = [("linear (uniform average)", "linear", merge_config(family, "linear", weight=1.0))]
    candidates += [
        (f"task_arithmetic weight={w}", "task_arithmetic", merge_config(family, "task_arithmetic", weight=w))
        for w in TA_WEIGHTS
    ]
    candidates += [
        (
            f"ties density={d} lambda={lam}",
            "ties",
            merge_config(family, "ties", weight=1.0, density=d, params={"lambda": lam}),
        )
        for d, lam in TIES_GRID
    ]
    candidates += [("fisher (floor 1e-6)", "fisher", merge_config(family, "fisher", data=data))]
    candidates += [
        (f"regmean alpha={a}", "regmean", merge_config(family, "regmean", params={"alpha": a}, data=data))
        for a in REGMEAN_ALPHAS
    ]
    tasks = family.tasks("select")
    evaluator = TaskEvaluator(
        tasks, include_paths=[TASKS], tokenizer=AutoTokenizer.from_pretrained(family.base), batch_size=64
    )
    scored = []
    for index, (label, method, config) in enumerate(candidates):
        path = work / f"config-{index}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        started = time.perf_counter()
        merge_file(path, work / f"out-{index}", progress=False, model_card=False)
        merge_seconds = time.perf_counter() - started
        model = AutoModelForCausalLM.from_pretrained(work / f"out-{index}", dtype=torch.float32)
        scores = evaluator.evaluate(model)
        accs = [scores[task]["acc,none"] for task in tasks]
        scored.append((label, method, accs, sum(accs) / len(accs), merge_seconds))
        print(label, [round(a, 3) for a in accs], round(scored[-1][3], 3), flush=True)

    def best(method: str):
        return max((row for row in scored if row[1] == method), key=lambda row: row[3])

    headline = [best("linear"), best("task_arithmetic"), best("ties"), best("fisher")]
    headline += [row for row in scored if row[1] == "regmean"]
    lines = [
        "| method (setting) | " + " | ".join(family.skills) + " | mean | merge (s) |",
        "|---|" + "---:|" * (len(family.skills) + 2),
    ]
    for label, _, accs, mean, seconds in headline:
        lines.append(f"| {label} | " + " | ".join(f"{a:.2f}" for a in accs) + f" | {mean:.3f} | {seconds:.1f} |")
    grid = ["| grid row | mean |", "|---|---:|"] + [
        f"| {label} | {mean:.3f} |" for label, method, _, mean, _ in scored if method in ("task_arithmetic", "ties")
    ]
    stats = [
        "| statistic | fine-tune | compute (s) | peak RSS (MiB) | RSS before (MiB) | file (MiB) | total |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for kind, skill, m in stats_rows:
        stats.append(
            f"| {kind} | {skill} | {m['seconds']:.1f} | {m['peak'] / 2**20:.0f} | {m['before'] / 2**20:.0f} | {m['bytes'] / 2**20:.2f} | {m['total']:.3g} |"
        )
    params = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(family.base).state_dict().values())
    body = f"""## Fisher and RegMean vs task arithmetic and TIES (demo family)

Command: `.venv/bin/python benchmarks/data_methods.py {" ".join(sys.argv[1:])}`{BREAK}
{machine_line(torch, threads="1 torch thread")}; {datetime.date.today().isoformat()}.

Four fine-tunes of one base (tiny Llama, {params / 1e6:.2f} M parameters), merged by `evomerge merge`; accuracy on
the held-out selection split (`demo_<skill>_select`, 100 items each). Statistics from each fine-tune's own
search split (`demo_<skill>`: min({args.examples}, 100) documents, the gold continuation given its prompt).
Task arithmetic and TIES: best of the grid below (same setting for every fine-tune); Fisher at its default;
RegMean at three alphas (0.1 is the default).

{chr(10).join(lines)}

Grid (mean over skills):

{chr(10).join(grid)}

Statistics, each fine-tune in a fresh process (peak RSS: the whole process, including torch, transformers and
lm-eval, which alone take the "RSS before" column; compute: building the examples with lm-eval, loading the
model and the pass over the examples; file: the cached safetensors; total: the sum of every Fisher entry, or of
every Gram matrix's trace). The Fisher here is the empirical one, the squared gradient of the gold answer's
log-likelihood: it is near zero where a fine-tune already gives its gold answers probability ~1, so a
fine-tune that fits its own data best carries the least weight in a Fisher merge.

{chr(10).join(stats)}
"""
    print(body)
    write_section(args.out, SECTION, body, title=TITLE)


if __name__ == "__main__":
    main()
