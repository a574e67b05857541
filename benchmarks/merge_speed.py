"""evomerge merge vs mergekit-yaml: wall time and peak RSS on the same configs and inputs.

A random-weight Llama family of about 100M parameters per model (a base and two fine-tunes),
stored in bf16, merged with linear, ties, dare_ties and slerp. Each tool runs as its own
process (CLI start-up included, as a user sees it), alternating, `--repeats` times; the table
reports medians and the ratio evomerge / mergekit. Writes results/merge_speed.md.

    .venv/bin/python benchmarks/merge_speed.py [--repeats 3] [--work /tmp/evomerge-bench]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

# This process stays small on purpose: Linux carries a parent's peak RSS into the rusage of
# the children it forks, so the family is built, and torch imported, only in child processes.
SHAPE_ARGS = "vocab=32000, hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4"
BUILD_FAMILY = f"""
import sys, torch
from evomerge.synthetic import LlamaShape, make_random_family
shape = LlamaShape({SHAPE_ARGS})
print(shape.num_params())
if sys.argv[2] == "build":
    make_random_family(sys.argv[1], shape=shape, finetunes=2, dtype=torch.bfloat16, seed=0)
"""

CONFIGS = {
    "linear": """merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 0.2}}}}
  - {{model: {ft1}, parameters: {{weight: 0.5}}}}
  - {{model: {ft2}, parameters: {{weight: 0.3}}}}
dtype: bfloat16
""",
    "ties": """merge_method: ties
base_model: {base}
models:
  - {{model: {ft1}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.5}}}}
dtype: bfloat16
""",
    "dare_ties": """merge_method: dare_ties
base_model: {base}
models:
  - {{model: {ft1}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.5}}}}
dtype: bfloat16
""",
    "slerp": """merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {ft1}}}]
parameters: {{t: [0, 0.5, 1]}}
dtype: bfloat16
""",
}


def run_measured(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process (its own rusage via wait4)."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-bench"))
    parser.add_argument("--out", type=Path, default=Path("results/merge_speed.md"))
    parser.add_argument("--methods", nargs="*", default=list(CONFIGS))
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    mergekit_yaml = shutil.which("mergekit-yaml", path=str(bin_dir)) or shutil.which("mergekit-yaml")
    if mergekit_yaml is None:
        sys.exit("mergekit-yaml not found: pip install -e '.[test]' (mergekit is a test extra)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    family_dir = args.work / "family"
    action = "reuse" if (family_dir / "ft2" / "config.json").exists() else "build"
    if action == "build":
        print(f"building a bf16 family in {family_dir} ...", flush=True)
    num_params = int(
        subprocess.run(
            [sys.executable, "-c", BUILD_FAMILY, str(family_dir), action],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        ).stdout.split()[0]
    )
    paths = {name: family_dir / name for name in ("base", "ft1", "ft2")}
    source_mib = sum(p.stat().st_size for p in family_dir.rglob("*.safetensors")) / 2**20

    rows = []
    for method in args.methods:
        config = args.work / f"{method}.yml"
        config.write_text(CONFIGS[method].format(**paths))
        samples: dict[str, list[tuple[float, float]]] = {"evomerge": [], "mergekit": []}
        for repeat in range(args.repeats):
            for tool in ("evomerge", "mergekit") if repeat % 2 == 0 else ("mergekit", "evomerge"):
                out = args.work / f"out-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                if tool == "evomerge":
                    argv = [str(bin_dir / "evomerge"), "merge", str(config), str(out), "--quiet"]
                else:
                    argv = [mergekit_yaml, str(config), str(out), "--quiet", "--random-seed", "0"]
                samples[tool].append(run_measured(argv, env))
        ours_wall = statistics.median(s[0] for s in samples["evomerge"])
        theirs_wall = statistics.median(s[0] for s in samples["mergekit"])
        ours_rss = statistics.median(s[1] for s in samples["evomerge"])
        theirs_rss = statistics.median(s[1] for s in samples["mergekit"])
        rows.append((method, ours_wall, theirs_wall, ours_rss, theirs_rss))
        print(
            f"{method:10} evomerge {ours_wall:6.2f}s {ours_rss:7.0f} MiB | mergekit {theirs_wall:6.2f}s {theirs_rss:7.0f} MiB"
            f" | time x{ours_wall / theirs_wall:.2f} rss x{ours_rss / theirs_rss:.2f}",
            flush=True,
        )

    lines = [
        "# Merge speed: `evomerge merge` vs `mergekit-yaml`",
        "",
        f"Inputs: a random-weight Llama family, 3 models x {num_params / 1e6:.1f}M parameters, bf16 safetensors "
        f"({source_mib:.0f} MiB on disk in all; LlamaShape({SHAPE_ARGS})). "
        "Same YAML for both tools, math in bf16, output bf16. Each tool is a fresh process (start-up and imports "
        f"included), the two alternate, median of {args.repeats} runs. Peak RSS from wait4() of each process.",
        "",
        "| method | evomerge wall (s) | mergekit wall (s) | wall ratio | evomerge peak RSS (MiB) | mergekit peak RSS (MiB) | RSS ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, ow, tw, orss, trss in rows:
        lines.append(
            f"| {method} | {ow:.2f} | {tw:.2f} | {ow / tw:.2f} | {orss:.0f} | {trss:.0f} | {orss / trss:.2f} |"
        )
    lines += [
        "",
        "Targets (issue: merge engine): wall ratio <= 0.5, RSS ratio <= 1.0.",
        "",
        f"Command: `.venv/bin/python benchmarks/merge_speed.py --repeats {args.repeats}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {version('torch')}, mergekit {version('mergekit')}, "
        f"no GPU; {datetime.date.today().isoformat()}.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
