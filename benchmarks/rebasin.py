"""Git Re-Basin on two-seed pairs: the loss barrier on the linear path before and after alignment.

For each task, model size and seed pair: train two tiny Llamas from different initialisations on
the same data (`evomerge.align.toy_pair`: a successor lookup and arithmetic sequences), align B to A with `weight_matching`,
and measure the held-out next-token loss of (1 - alpha) * A + alpha * B at alpha = 0, 0.25, 0.5,
0.75, 1 with B as trained and with B aligned. Barrier: loss at 0.5 minus the mean of the ends.
Then the speed of `align_models` end to end (read, match, write) on a random ~100M-parameter
bf16 Llama: B is a fine-tune of A (A plus small noise) with its units randomly permuted, so the
right answer is known (the fine-tune itself) and checked. Writes its section of
results/data_methods.md.

    .venv/bin/python benchmarks/rebasin.py [--pairs 3] [--skip-speed] [--out results/data_methods.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine_line, write_section  # noqa: E402

from evomerge.align import align_models, apply_permutations, permutation_spec, permute_tensor, weight_matching  # noqa: E402
from evomerge.align.toy_pair import ToyTask, barrier, interpolation_losses, sequences, toy_config, train  # noqa: E402
from evomerge.io.model_dir import ModelDir  # noqa: E402
from evomerge.io.safetensors_io import StreamingCheckpointWriter  # noqa: E402
from evomerge.synthetic import LlamaShape, make_random_family  # noqa: E402

SPEED_SHAPE = LlamaShape(vocab=8192, hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4)

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# (task, label, hidden, intermediate, layers, training steps)
CASES = (
    ("successor", "h64", 64, 256, 2, 150),
    ("successor", "h128", 128, 512, 2, 150),
    ("arithmetic", "h64", 64, 256, 2, 120),
    ("arithmetic", "h128", 128, 512, 2, 300),
)


def one_pair(case: tuple, seeds: tuple[int, int]) -> dict:
    kind, label, hidden, intermediate, layers, steps = case
    task = ToyTask(kind)
    label = f"{kind} {label}"
    config = toy_config(task, hidden=hidden, intermediate=intermediate, layers=layers)
    data, held_out = sequences(task, 512, seed=0), sequences(task, 256, seed=1)
    started = time.perf_counter()
    a, b = (
        {n: t.detach() for n, t in train(config, data, seed=s, steps=steps, batch=32, lr=5e-3).state_dict().items()}
        for s in seeds
    )
    trained = time.perf_counter()
    spec = permutation_spec("LlamaForCausalLM", config.to_dict(), {n: tuple(t.shape) for n, t in a.items()})
    result = weight_matching(spec, a, b, seed=0)
    aligned = {name: apply_permutations(spec, name, t, result.perms) for name, t in b.items()}
    matched = time.perf_counter()
    before = interpolation_losses(config, a, b, held_out, ALPHAS)
    after = interpolation_losses(config, a, aligned, held_out, ALPHAS)
    params = sum(t.numel() for t in a.values())
    return dict(
        label=label,
        params=params,
        steps=steps,
        seeds=seeds,
        before=before,
        after=after,
        sweeps=result.sweeps,
        train_s=trained - started,
        match_s=matched - trained,
    )


def table(rows: list[dict]) -> str:
    alphas = " | ".join(f"a={alpha:g}" for alpha in ALPHAS)
    lines = [
        f"| model | seeds | B | {alphas} | barrier | sweeps | match (s) | train both (s) |",
        "|---|---|---|" + "---:|" * (len(ALPHAS) + 4),
    ]
    for row in rows:
        for which in ("before", "after"):
            losses = row[which]
            cells = " | ".join(f"{loss:.3f}" for loss in losses)
            tail = f"{row['sweeps']} | {row['match_s']:.2f} | {row['train_s']:.1f}" if which == "after" else "- | - | -"
            name = "as trained" if which == "before" else "aligned"
            lines.append(
                f"| {row['label']} ({row['params'] / 1e3:.0f}k) | {row['seeds'][0]}, {row['seeds'][1]} | {name} | "
                f"{cells} | {barrier(losses):.3f} | {tail} |"
            )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    lines = []
    for label in dict.fromkeys(row["label"] for row in rows):
        mine = [row for row in rows if row["label"] == label]
        before = [barrier(row["before"]) for row in mine]
        after = [barrier(row["after"]) for row in mine]
        fell = sum(b_after < b_before for b_before, b_after in zip(before, after))
        lines.append(
            f"- {label}: median barrier {statistics.median(before):.3f} as trained, {statistics.median(after):.3f} "
            f"aligned; it fell in {fell} of {len(mine)} pairs."
        )
    return "\n".join(lines)


def _permuted_copy(source: Path, target: Path, seed: int) -> None:
    """`source` with a random permutation of every kind, written to `target` (same config)."""
    model = ModelDir(source)
    spec = permutation_spec(model.architecture, model.config, {n: tuple(i.shape) for n, i in model.tensors.items()})
    generator = torch.Generator().manual_seed(seed)
    perms = {}
    for name, size in spec.sizes.items():
        if name.startswith("heads."):
            groups = torch.randperm(size // spec.group, generator=generator)
            perms[name] = torch.cat([g * spec.group + torch.randperm(spec.group, generator=generator) for g in groups])
        else:
            perms[name] = torch.randperm(size, generator=generator)
    perms = {name: perm.numpy() for name, perm in perms.items()}
    layout = [(name, info.shape, info.dtype) for name, info in model.tensors.items()]
    with StreamingCheckpointWriter(target, layout) as writer:
        for name, _, _ in layout:
            writer.write(name, permute_tensor(spec, name, model.get(name), perms).contiguous())
    shutil.copyfile(source / "config.json", target / "config.json")
    model.close()


def speed_row(root: Path, device: str) -> dict:
    paths = make_random_family(root, shape=SPEED_SHAPE, finetunes=1, dtype=torch.bfloat16, seed=0)
    _permuted_copy(paths["ft1"], root / "ft1_permuted", seed=1)
    started = time.perf_counter()
    report = align_models(paths["base"], root / "ft1_permuted", root / "aligned", device=device, progress=False)
    seconds = time.perf_counter() - started
    aligned, truth = ModelDir(root / "aligned"), ModelDir(paths["ft1"])
    exact = all(torch.equal(aligned.get(name), truth.get(name)) for name in truth.tensors)
    params = sum(math.prod(info.shape) for info in truth.tensors.values())
    record = json.loads((root / "aligned" / "evomerge_alignment.json").read_text())
    return dict(
        params=params,
        sweeps=report.sweeps,
        seconds=seconds,
        exact=exact,
        permutations=len(record["permutations"]),
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="seed pairs per model size")
    parser.add_argument("--skip-speed", action="store_true", help="only the barrier table")
    parser.add_argument("--device", default="cpu", help="where the speed row's matching runs (cpu, cuda, auto)")
    parser.add_argument("--out", type=Path, default=Path("results/data_methods.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = ToyTask()
    started = time.perf_counter()
    rows = []
    for case in CASES:
        for pair in range(args.pairs):
            row = one_pair(case, (2 * pair + 1, 2 * pair + 2))
            print(
                f"{row['label']} seeds {row['seeds']}: barrier {barrier(row['before']):.3f} -> {barrier(row['after']):.3f}"
            )
            rows.append(row)
    speed_lines: list[str] = []
    if not args.skip_speed:
        torch.set_num_threads(2)
        with tempfile.TemporaryDirectory() as scratch:
            speed = speed_row(Path(scratch), args.device)
        shape = SPEED_SHAPE
        speed_lines = [
            "### Speed: `align_models` on a bigger model",
            "",
            f"A random Llama (vocab {shape.vocab}, hidden {shape.hidden}, MLP {shape.intermediate}, {shape.layers} "
            f"layers, {shape.heads} heads, {shape.kv_heads} key/value heads; {speed['params'] / 1e6:.0f}M parameters, "
            "bf16) as A; B = a fine-tune of A (A plus noise, `evomerge.synthetic`) with every unit kind randomly "
            "permuted. Time: `align_models(A, B, OUT, device=...)` end to end (read both, match, write B permuted), "
            f"2 torch threads, matching on {args.device}.",
            "",
            "| parameters | permutations | sweeps | time (s) | recovered the fine-tune exactly | peak RSS of the process (GB) |",
            "|---:|---:|---:|---:|---|---:|",
            f"| {speed['params'] / 1e6:.0f}M | {speed['permutations']} | {speed['sweeps']} | {speed['seconds']:.1f} | "
            f"{'yes' if speed['exact'] else 'no'} | {speed['peak_rss_gb']:.2f} |",
            "",
        ]
        print("\n".join(speed_lines))
    total = time.perf_counter() - started
    body = "\n".join(
        [
            "## Git Re-Basin: the loss barrier between two seeds, before and after `evomerge align`'s matching",
            "",
            f"Command: `.venv/bin/python benchmarks/rebasin.py --pairs {args.pairs}"
            f"{' --skip-speed' if args.skip_speed else ''}{' --device ' + args.device if args.device != 'cpu' else ''}`  ",
            f"{machine_line(torch, threads='1 torch thread')}; {datetime.date.today()}.",
            "",
            "Per row: two Llamas (4 heads, 2 key/value heads, 2 layers) trained from seeds (s1, s2) on the same "
            f"sequences of {task.length} tokens over a vocabulary of {task.vocab} (AdamW lr 5e-3, batch 32, the same "
            "batches for both); B aligned to A by `weight_matching` (seed 0, until a sweep changes nothing). "
            "Tasks: successor = x_t = T[x_(t-1)] for one fixed random permutation T (a lookup); arithmetic = "
            f"x_t = x_0 + t d mod {task.vocab}, d in 1..{task.max_step} (read off the first two tokens through "
            "attention). Loss: held-out next-token cross-entropy (tokens 3 on) of (1 - a) A + a B. Barrier: loss at "
            "a = 0.5 minus the mean of the two ends. Sizes: h64 = hidden 64, MLP 256; h128 = hidden 128, MLP 512; "
            "training steps: successor 150, arithmetic 120 (h64) and 300 (h128).",
            "",
            table(rows),
            "",
            summary(rows),
            "",
            *speed_lines,
            f"Total benchmark time {total:.0f}s.",
        ]
    )
    write_section(args.out, "rebasin", body, title="# Data-based and alignment methods")
    print(table(rows))
    print(summary(rows))


if __name__ == "__main__":
    main()
