"""The demo family's skills as a mixture of experts: the MoE's score per skill against each expert alone.

Builds (or reuses) the demo family, assembles MoEs with `evomerge moe` from its base and its four
fine-tunes (one expert per skill, in the family's skill order), each expert's positive prompts the
first questions of its skill's *search* split, and scores every model with lm-eval on the
*select* split (100 held-out items per skill). Prints a markdown table and writes it to the `moe`
section of results/data_methods.md with the command and machine.

    .venv/bin/python benchmarks/moe_bench.py [--family demo_models] [--prompts 8]
"""

from __future__ import annotations

import argparse
import os
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
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import yaml  # noqa: E402
from report import machine_line, write_section  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from evomerge.demo import build_demo_family, heldout_items  # noqa: E402
from evomerge.evaluate import TaskEvaluator  # noqa: E402
from evomerge.moe import build_moe  # noqa: E402

VARIANTS = [(mode, k) for mode in ("hidden", "cheap_embed", "random") for k in (1, 2)]


def moe_yaml(family, prompts: int, gate_mode: str, experts_per_token: int) -> dict:
    return {
        "base_model": str(family.base),
        "gate_mode": gate_mode,
        "experts_per_token": experts_per_token,
        "experts": [
            {
                "source_model": str(family.finetunes[skill]),
                "positive_prompts": [item["question"] for item in heldout_items(skill, "search")[:prompts]],
            }
            for skill in family.skills
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", type=Path, default=REPO / "demo_models", help="demo family (built if missing)")
    parser.add_argument("--prompts", type=int, default=8, help="positive prompts per expert (search-split questions)")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "data_methods.md")
    args = parser.parse_args()
    torch.set_num_threads(1)

    family = build_demo_family(args.family, seed=0, progress=True)
    tasks = family.tasks("select")
    tokenizer = AutoTokenizer.from_pretrained(family.base)
    evaluator = TaskEvaluator(tasks, include_paths=[REPO / "tasks"], tokenizer=tokenizer, batch_size=64)

    def score(path: Path) -> list[float]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        scores = evaluator.evaluate(model)
        return [scores[task]["acc,none"] for task in tasks]

    rows = [("base", score(family.base))]
    rows += [(f"expert alone: {skill}", score(family.finetunes[skill])) for skill in family.skills]
    build_seconds = []
    with tempfile.TemporaryDirectory() as scratch:
        for skill in family.skills:  # the ceiling of routing: one expert, always chosen
            config = moe_yaml(family, args.prompts, "random", 1)
            config["experts"] = [e for e in config["experts"] if e["source_model"] == str(family.finetunes[skill])]
            config_path = Path(scratch) / f"only-{skill}.yml"
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            build_moe(config_path, Path(scratch) / f"only-{skill}", progress=False)
            rows.append((f"base + {skill}'s MLPs only (a 1-expert MoE)", score(Path(scratch) / f"only-{skill}")))
        for gate_mode, k in VARIANTS:
            config_path = Path(scratch) / f"{gate_mode}-{k}.yml"
            config_path.write_text(yaml.safe_dump(moe_yaml(family, args.prompts, gate_mode, k), sort_keys=False))
            out = Path(scratch) / f"{gate_mode}-{k}"
            started = time.perf_counter()
            build_moe(config_path, out, progress=False)
            build_seconds.append(time.perf_counter() - started)
            rows.append((f"MoE, {gate_mode} gates, {k} expert{'s' if k > 1 else ''} per token", score(out)))

    header = "| model | " + " | ".join(family.skills) + " | mean |"
    lines = [header, "|" + "---|" * (len(family.skills) + 2)]
    for name, accs in rows:
        lines.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in accs) + f" | {sum(accs) / len(accs):.3f} |")
    table = "\n".join(lines)
    print(table)

    command = "python benchmarks/moe_bench.py " + " ".join(sys.argv[1:])
    body = f"""## MoE assembly (`evomerge moe`): the demo skills as experts

Accuracy (lm-eval `acc`, 4 options) on the **select** split of each skill (100 held-out items
each). Each MoE takes attention, norms, embeddings and head from the base and one expert per
fine-tune (the fine-tune's MLPs, layer by layer); each expert's positive prompts are the first
{args.prompts} questions of its skill's *search* split, no negative prompts (`random`: seed 0).

{table}

- command: `{command.strip()}`
- {machine_line(torch, threads="1 thread")}; transformers {version("transformers")}, lm-eval {version("lm_eval")}
- A MoE keeps the base's attention and embeddings, so it can hold at most what the experts'
  MLPs carry: the "MLPs only" rows (one expert, always chosen) are that ceiling per skill.
- building one MoE: {min(build_seconds):.1f}-{max(build_seconds):.1f} s (hidden gates run the base on the prompts)
"""
    write_section(args.results, "moe", body)
    print(f"\nwrote the 'moe' section of {args.results}")


if __name__ == "__main__":
    main()
