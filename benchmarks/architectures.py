"""Per-architecture table: merge parity with mergekit, frankenmerge, search, export hash, YAML round trip.

For every architecture of the test family (tests/families.py ARCHITECTURES: tiny random models
written by transformers' own `save_pretrained`) this runs the checks of
tests/test_architectures.py and writes one row per architecture to results/architectures.md:
each cell is `ok`, the reason a check does not apply, or the first line of the failure.

    PYTHONPATH=. .venv/bin/python benchmarks/architectures.py [--only llama,gpt_neox]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

COLUMNS = ("merge parity (mergekit 0.1.5)", "frankenmerge loads", "in-memory views", "3-trial search + export hash",
           "YAML round trip")  # fmt: skip


def outcome(check, *args) -> str:
    try:
        check(*args)
    except Exception as error:  # a row records the failure and the table goes on
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        traceback.print_exc()
        return f"FAILED: {lines[0][:120]}".replace("|", "/")
    return "ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated architectures (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "architectures.md")
    args = parser.parse_args()

    import torch
    import transformers
    from families import ARCHITECTURES, MORE_ARCHITECTURES, tiny_arch_family
    from report import machine_line
    from test_architectures import (
        MERGEKIT_CANNOT,
        frankenmerge_loads,
        linear_merge_parity,
        search_and_export,
        views_into_loaded_model,
        yaml_round_trip,
    )
    from test_evaluator_table import build_weight_mean, check_weight_mean

    from evomerge.evaluate.factory import EVALUATORS
    from evomerge.evaluate.protocol import EvaluatorKind

    EVALUATORS["weight_mean"] = EvaluatorKind(build=build_weight_mean, check=check_weight_mean)
    known = {**ARCHITECTURES, **MORE_ARCHITECTURES}
    names = [n for n in args.only.split(",") if n] or list(known)
    rows = []
    started = time.perf_counter()
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"evomerge-arch-{name}-") as work:
            root = Path(work)
            paths = tiny_arch_family(name, root / "family")
            (root / "parity").mkdir()
            (root / "franken").mkdir()
            (root / "search").mkdir()
            parity = outcome(linear_merge_parity, paths, root / "parity")
            if name in MERGEKIT_CANNOT:  # the reason is checked: mergekit must fail on it
                parity = f"n/a: {MERGEKIT_CANNOT[name]}" if parity.startswith("FAILED") else f"{parity} (unexpected)"
            franken = outcome(frankenmerge_loads, paths, root / "franken")
            views = outcome(views_into_loaded_model, paths)
            export = outcome(search_and_export, paths, root / "search")
            round_trip = outcome(yaml_round_trip, root / "search") if export == "ok" else "not reached"
            model_type, overrides = known[name]
            label = f"{name} ({model_type}{', ' + ', '.join(f'{k}={v}' for k, v in overrides.items()) if overrides else ''})"
            rows.append((label, parity, franken, views, export, round_trip))
            print(" | ".join(rows[-1]), flush=True)
    seconds = time.perf_counter() - started
    table = [
        "| architecture | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    body = "\n".join(
        [
            "# Architectures: merge, frankenmerge, search, export",
            "",
            "Tiny random models per architecture (the suite runs the first group, tests/families.py",
            "ARCHITECTURES; the rest, MORE_ARCHITECTURES, only here); hidden 32, 3 layers, vocab 64; a base and two",
            "fine-tunes written by transformers' `save_pretrained`. Checks, as in tests/test_architectures.py:",
            "",
            "- merge parity: a linear merge by `evomerge merge` and by mergekit's `run_merge`, loaded with",
            "  `from_pretrained`, agree to float32 rounding on every parameter;",
            "- frankenmerge: `slices` [0, 2) of one fine-tune and [1, 3) of the other (4 layers) loads with no",
            "  missing or unexpected keys, every per-layer config list re-indexed as the slices chose, embeddings",
            "  from the first slice and the head from the last;",
            "- in-memory views: every checkpoint tensor maps onto the loaded transformers model (renamed or fused)",
            "  and writing a fine-tune through them gives the model `from_pretrained` loads;",
            "- search + export hash: `evomerge run` (3 random trials, task_arithmetic/ties, a weight-mean",
            "  evaluator) then `evomerge export`, which checks the exported weights against the scored hash;",
            "- YAML round trip: `evomerge merge` of the exported mergekit_config.yml gives the same tensors.",
            "",
            *table,
            "",
            f"{len(rows)} architectures in {seconds:.0f} s; transformers {transformers.__version__}, "
            f"mergekit {version('mergekit')}.",
            "",
            f"Command: `PYTHONPATH=. .venv/bin/python benchmarks/architectures.py{' --only ' + args.only if args.only else ''}`  ",
            f"{machine_line(torch)}; {datetime.date.today().isoformat()}.",
        ]
    )
    args.out.write_text(body + "\n")
    print(body)


if __name__ == "__main__":
    main()
