"""LoRA sources in a search: factors resident vs deltas cached vs merged fine-tunes, memory and time.

A random-weight Llama (`--shape`, float32) and `--adapters` LoRA adapters over it (rank
`--rank`, every linear module of every layer, plus nothing saved whole). Three ways to hold the
same sources for a search of task_arithmetic and TIES candidates:

* `folders`: each adapter folded into a full checkpoint first (merge_and_unload, what users do
  today), the search then holds one full model per adapter;
* `cached`: `adapter_deltas: cached`, each adapted tensor computed once at load;
* `factors`: `adapter_deltas: factors`, only A and B resident, B @ A computed per candidate.

Each runs in its own process (peak RSS is per process); the table gives the resident bytes
ResidentSources reports, the process's peak RSS, the load time and the median in-place merge
time per candidate (`--candidates` of them, after one warm-up). Writes results/lora.md.

    .venv/bin/python benchmarks/lora_bench.py [--work /tmp/evomerge-lora-bench] [--candidates 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(work: Path, shape_args: dict, adapters: int, rank: int) -> None:
    """The base, the adapters (PEFT's file layout, random A and B) and their folded checkpoints."""
    import torch
    from safetensors.torch import save_file

    from evomerge.io.lora import AdapterModel, AdapterRef
    from evomerge.synthetic import LlamaShape, make_random_family

    shape = LlamaShape(**shape_args)
    make_random_family(work, shape=shape, finetunes=0, seed=0)
    base = work / "base"
    generator = torch.Generator().manual_seed(1)
    for index in range(adapters):
        folder = work / f"adapter{index}"
        folder.mkdir(exist_ok=True)
        factors = {}
        for name, dims in shape.tensors():
            module = name.removesuffix(".weight")
            if module.rsplit(".", 1)[-1] in LINEAR:
                out, inp = dims
                factors[f"base_model.model.{module}.lora_A.weight"] = (
                    torch.randn(rank, inp, generator=generator) / inp**0.5
                )
                factors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.01
        save_file(factors, folder / "adapter_model.safetensors")
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LINEAR)}
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
        folded = work / f"folded{index}"
        source = AdapterModel(AdapterRef(base, folder))
        folded.mkdir(exist_ok=True)
        save_file({name: source.get(name).contiguous() for name in source.tensors}, folded / "model.safetensors")
        shutil.copy(base / "config.json", folded / "config.json")


def measure(work: Path, mode: str, adapters: int, candidates: int) -> dict:
    """One mode's numbers (run in a child process)."""
    import resource

    import torch

    from evomerge.config.space import parse_space
    from evomerge.genome.parameters import ParameterGenome
    from evomerge.merge.resident import ResidentSources, materialize

    base = work / "base"
    if mode == "folders":
        models = [f"m{i}@{work / f'folded{i}'}" for i in range(adapters)]
    else:
        models = [f"m{i}@{base}+{work / f'adapter{i}'}" for i in range(adapters)]
    space = parse_space(
        {
            "models": models,
            "base_model": f"base@{base}",
            "dtype": "float32",
            "device": "cpu",
            "adapter_deltas": "cached" if mode == "cached" else "factors",
            "genome": {"layer_granularity": 2, "methods": ["task_arithmetic", "ties"]},
            "objectives": [{"task": "none"}],
            "search": {"n_trials": 1, "storage": "sqlite:///:memory:"},
        },
        base_dir=work,
    )
    genome = ParameterGenome(space)
    started = time.perf_counter()
    sources = ResidentSources(genome.models, dtype=torch.float32, adapters=space.adapter_deltas)
    load_seconds = time.perf_counter() - started
    plans = []
    for index in range(candidates + 1):
        params = {}
        for name, dist in genome.distributions().items():
            if hasattr(dist, "choices"):
                params[name] = dist.choices[index % len(dist.choices)]
            else:
                params[name] = dist.low + (dist.high - dist.low) * ((index * 0.37 + 0.1) % 1.0)
        plans.append(genome.plan(params))
    target = {r.name: torch.zeros(r.shape) for r in plans[0].tensors}
    times = []
    for plan in plans:
        started = time.perf_counter()
        materialize(plan, sources, target)
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    for model, adapted in sources.factors.items():  # factors mode: what one candidate spends on B @ A
        for tensor in adapted:
            sources.get(model, tensor)
    deltas = time.perf_counter() - started
    return {
        "deltas_s": deltas,
        "resident_mib": sources.nbytes / 2**20,
        "peak_rss_mib": peak,
        "load_s": load_seconds,
        "merge_s": statistics.median(times[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-lora-bench"))
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--shape", default="vocab=32000,hidden=768,intermediate=2048,layers=8,heads=12,kv_heads=4")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.work, args.child, args.adapters, args.candidates)))
        return
    import torch
    from report import machine_line, write_section

    from evomerge.synthetic import LlamaShape

    shape_args = {k: int(v) for k, v in (part.split("=") for part in args.shape.split(","))}
    shutil.rmtree(args.work, ignore_errors=True)
    build(args.work, shape_args, args.adapters, args.rank)
    rows = {}
    load_before = os.getloadavg()[0]
    for mode in ("folders", "cached", "factors"):
        command = [sys.executable, __file__, "--work", str(args.work), "--adapters", str(args.adapters)]
        command += ["--candidates", str(args.candidates), "--child", mode]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        rows[mode] = json.loads(result.stdout.strip().splitlines()[-1])
        print(mode, rows[mode], flush=True)
    params = LlamaShape(**shape_args).num_params()
    lines = [
        "## LoRA sources in a search (benchmarks/lora_bench.py)",
        "",
        f"Command: `python benchmarks/lora_bench.py --adapters {args.adapters} --rank {args.rank} "
        f"--candidates {args.candidates} --shape {args.shape}`",
        "",
        machine_line(torch, threads=f"{torch.get_num_threads()} torch threads"),
        f"Load average (1 min) before and after: {load_before:.1f}, {os.getloadavg()[0]:.1f}: on a shared "
        "machine the seconds move with it (compare rows of one run only); the bytes do not.",
        "",
        f"A random Llama of {params / 1e6:.0f}M parameters (float32) as base_model, {args.adapters} rank-"
        f"{args.rank} adapters on every linear module; candidates alternate task_arithmetic and TIES, one "
        "gene set per 2 layers. Resident: ResidentSources.nbytes; merge: median in-place merge of one "
        f"candidate over {args.candidates} (after a warm-up); base + B @ A alone: every adapted tensor "
        "computed once, after the merges, which a `factors` candidate does inside its merge (its recipes also leave the fused CPU "
        "kernel for the per-tensor path, so a fresh delta is never pinned across candidates). Peak RSS "
        "includes the merge's temporaries and the 380 MiB target model.",
        "",
        "| sources | resident MiB | peak RSS MiB | load s | merge s per candidate | base + B @ A alone s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "folders": "folded checkpoints (merge_and_unload first)",
        "cached": "adapters, `adapter_deltas: cached`",
        "factors": "adapters, `adapter_deltas: factors`",
    }
    for mode, row in rows.items():
        deltas = f"{row['deltas_s']:.2f}" if mode == "factors" else "-"
        lines.append(
            f"| {labels[mode]} | {row['resident_mib']:.0f} | {row['peak_rss_mib']:.0f} | {row['load_s']:.2f} | "
            f"{row['merge_s']:.2f} | {deltas} |"
        )
    write_section(REPO / "results" / "lora.md", "lora", "\n".join(lines), title="# LoRA sources")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
