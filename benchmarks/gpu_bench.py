"""GPU path: sources resident on the GPU, in-place re-merge vs the GPU's copy bandwidth, eval time.

Needs a CUDA device (exits with a message otherwise). Builds a random-weight Llama family
(~1.3B parameters per model in bf16 by default), loads it with ResidentSources on cuda, and times
materialize() of a task-arithmetic and a TIES candidate against torch copy_ of the same bytes;
then runs a short demo search on the GPU for the eval time per trial. Writes results/gpu.md.

    .venv/bin/python benchmarks/gpu_bench.py [--layers 24]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cuda_time(function, repeats=5) -> float:
    function()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "gpu.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark measures the GPU path (run it where a GPU is lent)")
    from evomerge.config.space import load_space
    from evomerge.genome.kinds import make_genome
    from evomerge.merge.resident import ResidentSources, materialize
    from evomerge.synthetic import LlamaShape, make_random_family

    device_name = torch.cuda.get_device_name(0)
    work = Path(tempfile.mkdtemp(prefix="evomerge-gpu-"))
    shape = LlamaShape(vocab=32000, hidden=2048, intermediate=5632, layers=args.layers, heads=16, kv_heads=4)
    family = make_random_family(work / "family", shape=shape, finetunes=4, dtype=torch.bfloat16)
    demo_space = load_space(REPO / "search_spaces" / "demo.yml", check_paths=False)
    space = demo_space.model_copy(
        update={
            "models": [m.model_copy(update={"path": family[f"ft{i + 1}"]}) for i, m in enumerate(demo_space.models)],
            "base_model": demo_space.base_model.model_copy(update={"path": family["base"]}),
            "dtype": "bfloat16",
            "device": "cuda",
            "genome": demo_space.genome.model_copy(update={"layer_granularity": args.layers // 4}),
        }
    )
    genome = make_genome(space)
    loaded = time.perf_counter()
    sources = ResidentSources(genome.models, dtype=torch.bfloat16, device="cuda")
    load_seconds = time.perf_counter() - loaded
    uniform = genome.uniform_params()
    ties = {k: ("ties" if k.endswith(".method") else 0.5 if k.endswith(".density") else v) for k, v in uniform.items()}
    rows = []
    for label, params in (("task_arithmetic", uniform), ("ties density 0.5", ties)):
        plan = genome.plan(params)
        target = {r.name: torch.empty(r.shape, dtype=torch.bfloat16, device="cuda") for r in plan.tensors}
        copies = {n: t.clone() for n, t in target.items()}
        out_bytes = sum(t.numel() * t.element_size() for t in target.values())
        merge = cuda_time(lambda plan=plan, target=target: materialize(plan, sources, target))
        copy = cuda_time(lambda target=target, copies=copies: [t.copy_(copies[n]) for n, t in target.items()])
        rows.append((label, out_bytes, merge, copy))
    lines = [
        f"# GPU path ({device_name})",
        "",
        f"Family: 5 random-weight Llama models x {shape.num_params() / 1e9:.2f}B parameters, bf16, resident on the GPU "
        f"({sources.nbytes / 2**30:.1f} GiB; loaded in {load_seconds:.1f}s). Median of 5, CUDA events.",
        "",
        "| candidate | output GB | in-place re-merge (s) | copy_ of output bytes (s) | copy bandwidth (GB/s) | re-merge vs copy |",
        "|---|---|---|---|---|---|",
    ]
    for label, out_bytes, merge, copy in rows:
        lines.append(
            f"| {label} | {out_bytes / 1e9:.2f} | {merge:.3f} | {copy:.4f} | {2 * out_bytes / copy / 1e9:.0f} | {copy / merge:.0%} |"
        )
    lines += [
        "",
        f"Command: `.venv/bin/python benchmarks/gpu_bench.py --layers {args.layers}`; {datetime.date.today().isoformat()}.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
