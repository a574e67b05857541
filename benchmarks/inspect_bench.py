"""`evomerge inspect`: how long it takes, and how close a sample comes to reading every entry.

Rows (writes results/inspect.md):
- the demo family, the command as a user runs it (process start, imports, plot included);
- the demo family read whole vs sampled at 4,096 entries per tensor: the largest differences in
  cosine, relative norm, sign conflict and trimmed overlap over every group (real fine-tunes);
- a random-weight bf16 family of ~160M parameters per model (base + 2 fine-tunes), sampled
  (the default) and read whole;
- a 7B-shaped family (Llama-2-7B tensor shapes, bf16, base + 3 fine-tunes) written as sparse
  files: headers real, data all zeros and never on disk, so it times the sampled reads and the
  math over 291 tensors x 4 models, not the disk (a cold disk adds 64 random 2 KB reads a tensor).

    .venv/bin/python benchmarks/inspect_bench.py [--work /tmp/evomerge-inspect-bench] [--demo-dir demo_models]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import machine_line, write_section  # noqa: E402

from evomerge.dtypes import safetensors_codes  # noqa: E402
from evomerge.inspect import Sampling, inspect_models  # noqa: E402
from evomerge.llama_shape import LlamaShape  # noqa: E402
from evomerge.synthetic import make_random_family  # noqa: E402

MEDIUM = LlamaShape(vocab=32000, hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=8)
LLAMA_7B = LlamaShape(vocab=32000, hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32)


def sparse_family(root: Path, shape: LlamaShape, names: list[str]) -> dict[str, Path]:
    """Checkpoints with real safetensors headers and all-zero data left as holes (no disk used)."""
    code = safetensors_codes()[torch.bfloat16]
    paths = {}
    for name in names:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        header, offset = {}, 0
        for tensor, dims in shape.tensors():
            nbytes = math.prod(dims) * 2
            header[tensor] = {"dtype": code, "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / "model.safetensors", "wb") as handle:
            handle.write(len(raw).to_bytes(8, "little") + raw)
            handle.truncate(8 + len(raw) + offset)
        (folder / "config.json").write_text(json.dumps(shape.config(torch.bfloat16)))
        paths[name] = folder
    return paths


def timed(base, models, sampling, repeats=3):
    """The fastest of `repeats` runs (page cache warm after the first): its result and CPU seconds."""
    best, best_cpu = None, None
    for _ in range(repeats):
        cpu = time.process_time()
        result = inspect_models(base, models, sampling=sampling)
        cpu = time.process_time() - cpu
        if best is None or result.seconds < best.seconds:
            best, best_cpu = result, cpu
    return best, best_cpu


def run_child(command, env):
    """Wall and CPU seconds (user + system) of one child process, and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), out


def largest_differences(a, b) -> dict[str, float]:
    """Max |a - b| of each statistic over every group (overall, layer groups, kinds)."""
    pairs = [(a.overall, b.overall)] + [
        (x.stats, y.stats) for x, y in zip(a.layer_groups + a.kinds, b.layer_groups + b.kinds)
    ]
    out = {}
    for field in ("cosine", "relative_norm", "sign_conflict", "trim_overlap"):
        diffs = [np.nanmax(np.abs(np.asarray(getattr(x, field)) - np.asarray(getattr(y, field)))) for x, y in pairs]
        out[field] = float(max(diffs))
    rel = np.abs(np.asarray(a.overall.relative_norm) / np.asarray(b.overall.relative_norm) - 1)
    out["relative_norm_rel"] = float(rel.max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-inspect-bench"))
    parser.add_argument(
        "--demo-dir", type=Path, default=Path(os.environ.get("EVOMERGE_TEST_DEMO_DIR", REPO / "demo_models"))
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "inspect.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    demo = args.demo_dir
    finetunes = ["close", "reverse", "shift", "sort"]
    if not (demo / "base").is_dir():
        raise SystemExit(f"{demo}: no demo family (build it with `evomerge demo build {demo}`)")
    space = work / "demo_space.yml"
    space.write_text(
        f"models: [{', '.join(f'{n}@{demo / n}' for n in finetunes)}]\nbase_model: base@{demo / 'base'}\n"
        "genome: {layer_granularity: 2, methods: [task_arithmetic, ties]}\n"
        "objectives: [{task: demo_close}]\nsearch: {n_trials: 1}\n"
    )
    command = [str(Path(sys.executable).with_name("evomerge")), "inspect", str(space), "--plot", str(work / "d.png")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    runs = [run_child(command, env) for _ in range(3)]
    wall, cpu, shown = min(runs)
    rows.append(("demo family (4 x 159K entries), `evomerge inspect space.yml --plot`, whole command", wall, cpu, ""))
    wall, cpu, _ = min(run_child([sys.executable, "-c", "import torch"], env) for _ in range(3))
    rows.append(("of which Python start and `import torch` alone", wall, cpu, "the same machine, the same minute"))
    base, models = ("base", demo / "base"), [(n, demo / n) for n in finetunes]
    whole, whole_cpu = timed(base, models, Sampling(entries=0))
    sampled, sampled_cpu = timed(base, models, Sampling(entries=4096, span=256))
    rows.append(
        ("demo family, library call, every entry", whole.seconds, whole_cpu, f"{whole.overall.entries_read:,} read")
    )
    diff = largest_differences(sampled, whole)
    rows.append(
        (
            "demo family, library call, 4,096 entries per tensor (256-entry spans)",
            sampled.seconds,
            sampled_cpu,
            f"{sampled.overall.entries_read:,} read; vs every entry, largest difference over all groups: "
            f"cosine {diff['cosine']:.3f}, sign conflict {diff['sign_conflict']:.3f}, "
            f"top-d overlap {diff['trim_overlap']:.3f}, norm {diff['relative_norm_rel']:.1%} (overall)",
        )
    )

    medium_dir = work / "medium"
    if not (medium_dir / "ft2" / "config.json").exists():
        shutil.rmtree(medium_dir, ignore_errors=True)
        make_random_family(medium_dir, shape=MEDIUM, finetunes=2, dtype=torch.bfloat16, seed=0)
    size_mb = sum(f.stat().st_size for f in (medium_dir / "base").glob("*.safetensors")) / 1e6
    base, models = ("base", medium_dir / "base"), [(n, medium_dir / n) for n in ("ft1", "ft2")]
    default, default_cpu = timed(base, models, Sampling())
    every, every_cpu = timed(base, models, Sampling(entries=0), repeats=1)
    diff = largest_differences(default, every)
    label = f"random bf16 family, {MEDIUM.num_params() / 1e6:.0f}M params ({size_mb:.0f} MB) per model, base + 2"
    rows.append(
        (
            f"{label}, default sample (65,536 per tensor)",
            default.seconds,
            default_cpu,
            f"{default.overall.entries_read:,} of {default.overall.entries:,} entries read per model; "
            f"vs every entry: cosine {diff['cosine']:.3f}, norm {diff['relative_norm_rel']:.1%}",
        )
    )
    rows.append((f"{label}, every entry (`--sample 0`)", every.seconds, every_cpu, ""))

    sparse = sparse_family(work / "sparse7b", LLAMA_7B, ["base", "ft1", "ft2", "ft3"])
    base, models = ("base", sparse["base"]), [(n, sparse[n]) for n in ("ft1", "ft2", "ft3")]
    seven, seven_cpu = timed(base, models, Sampling())
    rows.append(
        (
            f"7B-shaped family ({LLAMA_7B.num_params() / 1e9:.2f}B params, bf16, sparse files), base + 3, default sample",
            seven.seconds,
            seven_cpu,
            f"{seven.overall.tensors} tensors, {seven.overall.entries_read:,} entries read per model",
        )
    )
    shutil.rmtree(work / "sparse7b", ignore_errors=True)

    lines = [
        f"Command: `.venv/bin/python benchmarks/inspect_bench.py` ({datetime.date.today().isoformat()})",
        "",
        machine_line(torch, threads="1 torch thread"),
        "",
        f"1-minute load average at the start and the end: {load_start:.1f}, {os.getloadavg()[0]:.1f} "
        "(other jobs share the cores: wall times stretch with it; CPU seconds, user + system, much less)",
        "",
        "Library calls: the fastest of 3 (page cache warm after the first); the command: the fastest of 3 "
        "runs of the console script, process start, imports and plot included.",
        "",
        "| what | wall s | CPU s | notes |",
        "|---|---|---|---|",
        *(f"| {what} | {wall:.2f} | {cpu:.2f} | {notes} |" for what, wall, cpu, notes in rows),
    ]
    body = "\n".join(lines)
    title = "# `evomerge inspect`: speed, sampling error, and the demo family's output"
    write_section(args.out, "inspect", body, title=title)
    output = "\n".join(line.rstrip() for line in shown.replace(str(work), "WORK").splitlines())
    write_section(
        args.out,
        "inspect_demo_output",
        "The whole output on the demo family, with the genome of `search_spaces/demo.yml` "
        f"(layer_granularity 2):\n\n```text\n$ evomerge inspect space.yml --plot WORK/d.png\n{output}\n```",
        title=title,
    )
    print(body)


if __name__ == "__main__":
    main()
