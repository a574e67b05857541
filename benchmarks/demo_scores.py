"""Scores of the demo family: the base, each fine-tune and a few plain state-dict merges.

Builds the demo family into `demo_models/` (or reuses it), scores every model with lm-eval on
the selection split of every skill (`demo_<skill>_select`, 100 held-out items each), prints a
markdown table and writes it to results/demo_scores.md with the command and machine.

    .venv/bin/python benchmarks/demo_scores.py [--out demo_models] [--seed 0] [--split select]

The merges are the simplest ones, computed here with state-dict arithmetic so the table does not
depend on the merge engine: the uniform average of the fine-tunes, and task arithmetic
`base + lambda * sum_i (finetune_i - base)` at a few lambdas.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(tempfile.gettempdir()) / "evomerge-hf-datasets"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from evomerge.demo import build_demo_family  # noqa: E402
from evomerge.evaluate import TaskEvaluator  # noqa: E402

TASK_ARITHMETIC_LAMBDAS = (0.5, 0.75, 1.0, 1.25)


def task_arithmetic(base, finetunes, lam: float, only=lambda name: True) -> dict[str, torch.Tensor]:
    """`base + lam * sum of task vectors` on the tensors `only` selects; the base elsewhere."""
    return {
        name: base[name] + lam * sum(ft[name] - base[name] for ft in finetunes.values()) if only(name) else base[name]
        for name in base
    }


def merged_states(base: dict[str, torch.Tensor], finetunes: dict[str, dict[str, torch.Tensor]], num_layers: int):
    """(name, state dict) of each merge in the table."""
    n = len(finetunes)
    yield (
        "linear: uniform average of the fine-tunes",
        {name: sum(ft[name] for ft in finetunes.values()) / n for name in base},
    )
    for lam in TASK_ARITHMETIC_LAMBDAS:
        yield f"task arithmetic, lambda={lam}", task_arithmetic(base, finetunes, lam)

    # Where the skills live: task arithmetic on one half of the network, the base on the other.
    half = num_layers // 2

    def lower_half(name: str) -> bool:
        return "embed_tokens" in name or any(f"layers.{i}." in name for i in range(half))

    yield (
        f"task arithmetic 0.75 on embeddings + layers 0-{half - 1} only",
        task_arithmetic(base, finetunes, 0.75, lower_half),
    )
    yield (
        f"task arithmetic 0.75 on layers {half}-{num_layers - 1} + final norm + lm_head only",
        task_arithmetic(base, finetunes, 0.75, lambda name: not lower_half(name)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo_models", help="family directory (built if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=["search", "select"], default="select")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "demo_scores.md")
    args = parser.parse_args()
    # One thread: as fast as two for this tiny model, and not far slower when another process
    # competes for the cores (OpenMP spin-waiting).
    torch.set_num_threads(1)

    load_at_start = os.getloadavg()[0]
    started = time.perf_counter()
    family = build_demo_family(args.out, seed=args.seed, progress=True)
    build_seconds = time.perf_counter() - started
    manifest_seconds = json.loads((family.root / "family.json").read_text())["build_seconds"]
    if build_seconds > 5:
        build_note = (
            f"built in {build_seconds:.0f} s (1 thread; load average {load_at_start:.1f} at the start:"
            " the machine is shared with other jobs, so timings vary)"
        )
    else:
        build_note = f"reused (built earlier in {manifest_seconds:.0f} s)"

    tasks = family.tasks(args.split)
    tokenizer = AutoTokenizer.from_pretrained(family.base)
    evaluator = TaskEvaluator(tasks, include_paths=[REPO / "tasks"], tokenizer=tokenizer, batch_size=64)
    # One model object whose weights are overwritten in place for every row, the way a merge
    # search scores its candidates.
    model = AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.float32)
    states = {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
        for name, path in family.models.items()
    }
    base = states["base"]
    finetunes = {skill: states[skill] for skill in family.skills}
    candidates = [("base", base)] + [(f"fine-tune: {s}", finetunes[s]) for s in family.skills]
    candidates += list(merged_states(base, finetunes, model.config.num_hidden_layers))

    rows = []
    eval_seconds = []
    for name, state in candidates:
        model.load_state_dict(state)
        t0 = time.perf_counter()
        scores = evaluator.evaluate(model)
        eval_seconds.append(time.perf_counter() - t0)
        accs = [scores[task]["acc,none"] for task in tasks]
        rows.append((name, accs, sum(accs) / len(accs)))

    best_finetune = max(mean for name, _, mean in rows if name.startswith("fine-tune"))
    header = "| model | " + " | ".join(family.skills) + " | mean |"
    lines = [header, "|" + "---|" * (len(family.skills) + 2)]
    for name, accs, mean in rows:
        beats = mean > best_finetune and not name.startswith(("fine-tune", "base"))
        mean_cell = f"**{mean:.3f}**" if beats else f"{mean:.3f}"
        lines.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in accs) + f" | {mean_cell} |")
    table = "\n".join(lines)
    print(table)

    command = "python benchmarks/demo_scores.py " + " ".join(sys.argv[1:])
    out = args.out.resolve()
    shown_out = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    report = f"""# Demo family scores

Accuracy (lm-eval `acc`, multiple choice, 4 options) on the **{args.split}** split of each skill
(`{"`, `".join(tasks)}`; 100 held-out items each). Merges in **bold** beat every single
fine-tune on the mean over skills.

{table}

- command: `{command.strip()}`
- machine: {platform.platform()}, {os.cpu_count()} CPU cores, no GPU; torch {torch.__version__} (1 thread),
  transformers {version("transformers")}, lm-eval {version("lm_eval")}
- date: {datetime.date.today().isoformat()}
- family: seed {args.seed}, in `{shown_out}`; {build_note}
- scoring: {len(tasks)} tasks x 100 items per model, {sum(eval_seconds) / len(eval_seconds):.1f} s per model
  (median of {len(eval_seconds)}: {sorted(eval_seconds)[len(eval_seconds) // 2]:.1f} s), one in-memory model
  whose weights are overwritten in place between rows

Task arithmetic is `base + lambda * sum_i (finetune_i - base)`; the uniform average of the four
fine-tunes equals task arithmetic at lambda = 0.25. The last two rows apply task arithmetic to one
half of the network and keep the base's weights in the other: the skills live mostly in the
embeddings and the first layers, so per-layer weights matter to a search as well as per-model ones.
"""
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(report, encoding="utf-8")
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
