"""Search-service benchmarks on the demo family; writes results/search.md (+ two PNG plots).

(a) trial overhead: (trial wall - lm-eval time) / trial wall, where the wall runs from optuna's
    ask to its tell (genome decode, in-place merge, hash, store writes, optuna bookkeeping);
(b) in-place re-merge speed vs a plain memory copy (torch copy_) of the same bytes, on the demo
    family and on a ~100M-parameter random family;
(c) search efficiency: best mean skill and front hypervolume vs trial count for cmaes, tpe,
    nsga2 and random, same seed and budget.

    .venv/bin/python benchmarks/search_bench.py [--trials 40] [--overhead-trials 20]
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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.config.space import load_space  # noqa: E402
from evomerge.demo import build_demo_family  # noqa: E402
from evomerge.dtypes import torch_dtype  # noqa: E402
from evomerge.merge import native  # noqa: E402
from evomerge.merge.resident import ResidentSources, materialize  # noqa: E402
from evomerge.search.pareto import hypervolume_history  # noqa: E402
from evomerge.search.plot import plot_search_efficiency  # noqa: E402
from evomerge.search.runner import run_search  # noqa: E402
from evomerge.workers.candidate import CandidateWorker  # noqa: E402


def with_search(space, **updates):
    return space.model_copy(update={"search": space.search.model_copy(update=updates)})


def timed(function, repeats: int) -> float:
    """Median seconds of `repeats` calls (after one warm-up)."""
    function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def ms(seconds: float) -> str:
    """Milliseconds to three significant digits, without exponents."""
    value = seconds * 1e3
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def remerge_vs_copy(genome, params, *, repeats: int) -> dict[str, float]:
    plan = genome.plan(params)
    dtype = torch_dtype(genome.space.dtype)  # the search's math dtype: sources are kept resident in it
    sources = ResidentSources(genome.models, dtype=dtype)
    target = {r.name: torch.empty(r.shape, dtype=dtype) for r in plan.tensors}
    copies = {name: tensor.clone() for name, tensor in target.items()}
    out_bytes = sum(t.numel() * t.element_size() for t in target.values())
    inputs = {(m, t) for r in plan.tensors for m, t in r.inputs}
    in_bytes = sum(sources.get(m, t).numel() * sources.get(m, t).element_size() for m, t in inputs)

    def copy_output():
        for name, tensor in target.items():
            tensor.copy_(copies[name])

    read_all = [sources.get(m, t) for m, t in sorted(inputs)]
    scratch = {id(t): torch.empty_like(t) for t in read_all}

    def copy_all():  # the same bytes the merge moves: every source read once, every output written
        for tensor in read_all:
            scratch[id(tensor)].copy_(tensor)
        copy_output()

    started = time.perf_counter()
    materialize(plan, sources, target)  # the first candidate also fills the TIES histogram cache
    first = time.perf_counter() - started
    # A round times enough back-to-back calls to last ~20 ms (one call of a ~1 ms demo re-merge
    # is at the mercy of the timer and the scheduler), the same count for the merge and copies.
    calls = max(1, round(0.02 / max(timed(lambda: materialize(plan, sources, target), 3), 1e-6)))

    def per_call(function) -> float:
        function()
        started = time.perf_counter()
        for _ in range(calls):
            function()
        return (time.perf_counter() - started) / calls

    # Interleaved (merge, copy, copy per round), so drift on a shared machine hits all three alike.
    rounds = [
        [per_call(f) for f in (lambda: materialize(plan, sources, target), copy_output, copy_all)]
        for _ in range(repeats)
    ]
    merge, copy_out, copy_in_and_out = (statistics.median(column) for column in zip(*rounds))
    return {
        "first_s": first,
        "merge_s": merge,
        "copy_out_s": copy_out,
        "copy_all_s": copy_in_and_out,
        "out_mb": out_bytes / 1e6,
        "in_mb": in_bytes / 1e6,
        "tensors": len(plan.tensors),
        "calls": calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=40, help="budget per sampler for (c)")
    parser.add_argument("--overhead-trials", type=int, default=20)
    parser.add_argument("--samplers", nargs="*", default=["cmaes", "tpe", "nsga2", "random"])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "search.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    build_demo_family(REPO / "demo_models", progress=False)
    base_space = load_space(REPO / "search_spaces" / "demo.yml")
    work = Path(tempfile.mkdtemp(prefix="evomerge-search-bench-"))
    worker = CandidateWorker(base_space)
    lines = [
        "# Search service benchmarks (demo family)",
        "",
        f"Command: `.venv/bin/python benchmarks/search_bench.py --trials {args.trials} --overhead-trials {args.overhead_trials}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}. Space: `search_spaces/demo.yml` (4 objectives, "
        f"{len(worker.genome.distributions())} genes).",
        "",
    ]

    # (a) overhead per trial. The fused kernel is built first: a one-off (about a second, once per
    # machine and kernel version, cached on disk), not a per-trial cost.
    native.library()
    events = []
    space = with_search(base_space, storage=f"sqlite:///{work / 'overhead.db'}", study_name="overhead", finalists=0)
    run_search(space, n_trials=args.overhead_trials, progress=False, worker=worker, on_trial=events.append)
    rows = [(e["wall_seconds"], e["eval_seconds"], e["merge_seconds"], e["hash_seconds"]) for e in events]
    overheads = [(wall - ev) / wall for wall, ev, _, _ in rows]
    lines += [
        "## (a) Trial overhead",
        "",
        "Per trial, from optuna `ask` to `tell`: everything that is not lm-eval (genome decode, in-place merge, "
        f"weights hash, trial-store writes, optuna storage). {len(rows)} trials, TPE, SQLite storage.",
        "",
        "| | median | mean | max |",
        "|---|---|---|---|",
        f"| trial wall (s) | {statistics.median(r[0] for r in rows):.3f} | {statistics.mean(r[0] for r in rows):.3f} | {max(r[0] for r in rows):.3f} |",
        f"| lm-eval (s) | {statistics.median(r[1] for r in rows):.3f} | {statistics.mean(r[1] for r in rows):.3f} | {max(r[1] for r in rows):.3f} |",
        f"| in-place merge (s) | {statistics.median(r[2] for r in rows):.4f} | {statistics.mean(r[2] for r in rows):.4f} | {max(r[2] for r in rows):.4f} |",
        f"| weights hash (s) | {statistics.median(r[3] for r in rows):.4f} | {statistics.mean(r[3] for r in rows):.4f} | {max(r[3] for r in rows):.4f} |",
        f"| **overhead share** | **{statistics.median(overheads):.1%}** | **{statistics.mean(overheads):.1%}** | {max(overheads):.1%} |",
        "",
        "Target: overhead <= 5% of the trial wall.",
        "",
    ]
    print("\n".join(lines[-13:]), flush=True)

    # (b) re-merge vs memory copy
    lines += [
        "## (b) In-place re-merge vs a plain memory copy",
        "",
        "Re-merge: `materialize` of one candidate into resident tensors (sources resident on CPU, in the space's "
        "dtype, which is also the math dtype). Copy baselines: `copy_` of the output bytes alone, and of the bytes the merge moves (every source "
        "tensor read once + every output written). Speed ratio = copy time / merge time (1.0 = as fast as a copy). "
        f"Median of 9 interleaved rounds (merge, copies), each the mean of `calls` back-to-back calls (a round lasts ~20 ms), after the first merge, which is shown apart: it also faults in the freshly allocated output "
        f"and builds the |delta| histograms that TIES cuts are read from in every later trial. Fused C kernel: {'on' if native.library() else 'OFF (no compiler)'}; "
        f"bf16 TIES sign election in AVX-512 registers: {'on' if native.bf16_register_election() else 'off (no AVX-512 BF16 here)'}.",
        "",
        "| family | dtype | genome | tensors | sources MB | output MB | first merge (ms) | calls | merge (ms) | copy output (ms) | copy all bytes (ms) | vs output copy | vs same-bytes copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    from evomerge.genome.kinds import make_genome
    from evomerge.synthetic import LlamaShape, make_random_family

    big_dir = work / "big"
    big = make_random_family(
        big_dir,
        shape=LlamaShape(vocab=32000, hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4),
        finetunes=4,
    )
    big_space = base_space.model_copy(
        update={
            "models": [m.model_copy(update={"path": big[f"ft{i + 1}"]}) for i, m in enumerate(base_space.models)],
            "base_model": base_space.base_model.model_copy(update={"path": big["base"]}),
        }
    )
    for label, genome in (
        ("demo", worker.genome),
        ("random ~100M", make_genome(big_space)),
        ("random ~100M", make_genome(big_space.model_copy(update={"dtype": "bfloat16"}))),
    ):
        uniform = genome.uniform_params()
        ties = dict(uniform)
        for name in ties:
            if name.endswith(".method"):
                ties[name] = "ties"
            elif name.endswith(".density"):
                ties[name] = 0.5
        for genome_name, params in (("task_arithmetic (soup)", uniform), ("ties, density 0.5", ties)):
            r = remerge_vs_copy(genome, params, repeats=9)
            lines.append(
                f"| {label} | {genome.space.dtype} | {genome_name} | {r['tensors']} | {r['in_mb']:.1f} | "
                f"{r['out_mb']:.1f} | {ms(r['first_s'])} | {r['calls']} | {ms(r['merge_s'])} | "
                f"{ms(r['copy_out_s'])} | {ms(r['copy_all_s'])} | {r['copy_out_s'] / r['merge_s']:.0%} | {r['copy_all_s'] / r['merge_s']:.0%} |"
            )
            print(lines[-1], flush=True)
    lines += ["", "Target: re-merge at >= 50% of copy speed.", ""]

    # (c) sampler efficiency
    curves_best, curves_hv, table = {}, {}, []
    directions = [o.direction for o in base_space.objectives]
    for sampler in args.samplers:
        events = []
        space = with_search(
            base_space,
            sampler=sampler,
            storage=f"sqlite:///{work / f'{sampler}.db'}",
            study_name=f"eff-{sampler}",
            finalists=0,
        )
        t0 = time.perf_counter()
        run_search(space, n_trials=args.trials, progress=False, worker=worker, on_trial=events.append)
        seconds = time.perf_counter() - t0
        values = [e["values"] for e in sorted(events, key=lambda e: e["number"])]
        best, running = [], -1.0
        for v in values:
            running = max(running, sum(v) / len(v))
            best.append(running)
        hv = hypervolume_history(values, directions, [0.0] * len(directions))
        curves_best[sampler], curves_hv[sampler] = best, hv
        marks = [max(1, len(values) // 4), max(1, len(values) // 2), len(values)]
        table.append((sampler, [best[m - 1] for m in marks], [hv[m - 1] for m in marks], seconds, marks))
        print(sampler, f"best {best[-1]:.3f} hv {hv[-1]:.4f} {seconds:.0f}s", flush=True)
    png_best = plot_search_efficiency(
        args.out.with_name("search_efficiency_best.png"),
        curves_best,
        ylabel="best mean accuracy (search split)",
        title="Best mean skill vs trials",
    )
    png_hv = plot_search_efficiency(
        args.out.with_name("search_efficiency_hypervolume.png"),
        curves_hv,
        ylabel="hypervolume (ref 0)",
        title="Front hypervolume vs trials",
    )
    marks = table[0][4] if table else []
    lines += [
        "## (c) Search efficiency",
        "",
        f"Same space, seed 0, {args.trials} trials per sampler (the first {len(worker.genome.finetunes) + 1} are the "
        "enqueued parents and uniform soup, shared by all). Best mean accuracy over the four skills (search split) "
        "and hypervolume of the 4-objective front (reference point 0), after n trials. cmaes optimises the "
        "weighted sum; the others the 4 objectives.",
        "",
        "| sampler | "
        + " | ".join(f"best mean @{m}" for m in marks)
        + " | "
        + " | ".join(f"hypervolume @{m}" for m in marks)
        + " | wall (s) |",
        "|---|" + "---|" * (2 * len(marks) + 1),
    ]
    for sampler, bests, hvs, seconds, _ in table:
        lines.append(
            f"| {sampler} | "
            + " | ".join(f"{b:.3f}" for b in bests)
            + " | "
            + " | ".join(f"{h:.4f}" for h in hvs)
            + f" | {seconds:.0f} |"
        )
    lines += [
        "",
        f"![best]({png_best.name}) ![hypervolume]({png_hv.name})",
        "",
        f"Total benchmark time {time.perf_counter() - started:.0f}s.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
