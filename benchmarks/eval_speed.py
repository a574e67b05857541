"""Evaluation time per candidate on the demo family: lm-eval as today, the request cache, and the forward-pass bound.

The four demo search tasks (100 items each, multiple choice, 4 choices: 1600 loglikelihood
requests), batch size as in search_spaces/demo.yml, one model object:
  (a) TaskEvaluator: lm_eval.evaluator.evaluate on every call;
  (b) RequestCacheEvaluator: requests built and tokenised once, per call the model and lm-eval's scoring;
  (c) the bound: a plain batched forward over the same token rows as (b) (same order, same batches,
      right padding, full logits), no scoring.
The arms alternate within each repeat (the machine is shared); the table has medians and the
ratio to (c), plus where (b)'s time goes. Writes the table between this script's markers in
results/fitness.md.

    .venv/bin/python benchmarks/eval_speed.py [--family demo_models] [--repeats 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from report import machine_line, write_section  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from evomerge.evaluate.harness import TaskEvaluator  # noqa: E402
from evomerge.evaluate.loglikelihood_rows import Row, RowTable, _packed_inputs  # noqa: E402
from evomerge.evaluate.request_cache import RequestCacheEvaluator  # noqa: E402

TASKS = ["demo_close", "demo_reverse", "demo_shift", "demo_sort"]
BATCH_SIZE = 64  # search_spaces/demo.yml
BEGIN, END = "<!-- BEGIN eval_speed -->", "<!-- END eval_speed -->"
TITLE = "# Cheap fitness: measurements (demo family)"


def plain_rows(cached: RequestCacheEvaluator) -> list[list[Row]]:
    """Every request of (b) as its own row (HFLM's token sequence), longest first, in batches of BATCH_SIZE."""
    table = RowTable(cached._table.max_length, pack=False)
    requests = [
        single
        for task in cached._cached.values()
        for doc_requests in task.scored.values()
        for request in doc_requests
        for single in table.add([(None, request.context, request.continuation)])
    ]
    return [[table.rows[index] for index in rows] for rows, _ in table.batches(requests, BATCH_SIZE)]


def bound_pass(model, batches: list[list[Row]]) -> None:
    """(c): the model over every request's token sequence, batched and right padded; nothing scored."""
    with torch.inference_mode():
        for rows in batches:
            inputs = torch.zeros((len(rows), len(rows[0].tokens)), dtype=torch.long)
            for slot, row in enumerate(rows):
                inputs[slot, : len(row.tokens)] = torch.tensor(row.tokens)
            model(inputs)


def packed_pass(model, cached: RequestCacheEvaluator) -> None:
    """(c) over (b)'s packed rows: the same forward (block masks, position ids, use_cache off), nothing scored."""
    table = cached._table
    requests = [request for task in cached._cached.values() for rs in task.scored.values() for request in rs]
    with torch.inference_mode():
        for rows, _ in table.batches(requests, BATCH_SIZE):
            tensors = [table.tensors[index] for index in rows]
            width = max(len(t.tokens) for t in tensors)
            inputs = torch.zeros((len(rows), width), dtype=torch.long)
            for slot, t in enumerate(tensors):
                inputs[slot, : len(t.tokens)] = t.tokens
            model(inputs, use_cache=False, **_packed_inputs(model, tensors, width))


class PhaseTimer:
    """Wraps a few of (b)'s steps on the instance, adding up the seconds spent in each."""

    def __init__(self, evaluator: RequestCacheEvaluator, phases: dict[str, str]):
        self.seconds = dict.fromkeys(phases.values(), 0.0)
        for method_name, label in phases.items():
            original = getattr(evaluator, method_name)

            def timed(*args, _original=original, _label=label, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds[_label] += time.perf_counter() - start

            setattr(evaluator, method_name, timed)


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=Path, default=REPO / "demo_models")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark machine is shared)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "fitness.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(args.family / "base")
    model = AutoModelForCausalLM.from_pretrained(args.family / "base", dtype=torch.float32)
    start = time.perf_counter()
    plain = TaskEvaluator(TASKS, include_paths=[REPO / "tasks"], tokenizer=tokenizer, batch_size=BATCH_SIZE)
    loading = time.perf_counter() - start
    cached = RequestCacheEvaluator(TASKS, include_paths=[REPO / "tasks"], tokenizer=tokenizer, batch_size=BATCH_SIZE)
    unpacked = RequestCacheEvaluator(TASKS, include_paths=[REPO / "tasks"], tokenizer=tokenizer, batch_size=BATCH_SIZE)
    unpacked._pack = False
    first_plain = timed(lambda: plain.evaluate(model))
    first_cached = timed(lambda: cached.evaluate(model))  # builds and tokenises the requests
    unpacked.evaluate(model)
    batches = plain_rows(cached)
    expected = plain.evaluate_items(model)
    same = expected == cached.evaluate_items(model) and expected == unpacked.evaluate_items(model)

    phases = PhaseTimer(
        cached,
        {"_run_loglikelihood": "model pass and per-row logprobs", "_score": "lm-eval filters + process_results"},
    )
    arms = {
        "a": lambda: plain.evaluate(model),
        "b": lambda: cached.evaluate(model),
        "b0": lambda: unpacked.evaluate(model),
        "c": lambda: bound_pass(model, batches),
        "cp": lambda: packed_pass(model, cached),
    }
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.repeats):
        for arm, call in arms.items():
            times[arm].append(timed(call))
    median = {arm: statistics.median(values) for arm, values in times.items()}
    per_call = {label: seconds / args.repeats for label, seconds in phases.seconds.items()}
    per_call["the rest (selection, lm-eval aggregation)"] = statistics.mean(times["b"]) - sum(per_call.values())

    requests = sum(len(rows) for rows in batches)
    tokens = sum(len(row.tokens) for rows in batches for row in rows)
    packed_tokens = sum(len(row.tokens) for row in cached._table.rows)
    names = {
        "a": "(a) lm-eval `evaluate` per call (TaskEvaluator)",
        "b": f"(b) request cache, choices packed ({len(cached._table.rows)} rows, {packed_tokens} tokens)",
        "b0": f"(b) request cache, packing off ({requests} rows, {tokens} tokens)",
        "c": f"(c) bound: batched forward over the requests' sequences ({requests} rows, {tokens} tokens)",
        "cp": "(c) the same forward over (b)'s packed rows (full logits)",
    }
    lines = [
        BEGIN,
        "## Evaluation time per candidate (`benchmarks/eval_speed.py`)",
        "",
        f"Command: `.venv/bin/python benchmarks/eval_speed.py --repeats {args.repeats} --threads {args.threads}`  ",
        f"{machine_line(torch, threads=f'{args.threads} torch thread(s)')}, lm-eval {version('lm_eval')}, "
        f"transformers {version('transformers')}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        f"The demo family's base model on the 4 demo search tasks: 400 items, {requests} loglikelihood requests "
        f"({tokens} tokens), batch size {BATCH_SIZE}. Medians of {args.repeats} calls per arm, the arms "
        f"alternating. Scores of (a) and both (b), every metric and every item: {'equal' if same else 'DIFFERENT'}.",
        "",
        "| arm | s per candidate | x bound |",
        "|---|---:|---:|",
    ]
    for arm in arms:
        lines.append(f"| {names[arm]} | {median[arm]:.3f} | {median[arm] / median['c']:.2f} |")
    lines += [
        "",
        f"Once per evaluator: loading the tasks {loading:.2f} s (both); (b) also builds and tokenises the requests "
        f"on its first call ({first_cached:.2f} s, against {first_plain:.2f} s for (a)'s first call).",
        "",
        "Where (b)'s time goes (packed; mean per call):",
        "",
        "| step | s | share |",
        "|---|---:|---:|",
    ]
    total = statistics.mean(times["b"])
    for label, seconds in per_call.items():
        lines.append(f"| {label} | {seconds:.3f} | {seconds / total:.0%} |")
    lines.append(END)
    table = "\n".join(lines)
    print(table)

    write_section(args.out, "eval_speed", table.removeprefix(BEGIN).removesuffix(END), title=TITLE)


if __name__ == "__main__":
    main()
