"""`evomerge align`: Git Re-Basin, a model trained from another initialisation permuted to match a reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evomerge import cli_checks
from evomerge.cli_checks import SEED_MAX

MAX_SWEEPS = 10_000


def align(
    model_a: Annotated[Path, typer.Argument(help="The reference model (left as it is).")],
    model_b: Annotated[
        Path, typer.Argument(help="The model to permute so that its hidden units line up with MODEL_A's.")
    ],
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Where to write the permuted MODEL_B (a checkpoint usable as a merge input).",
            callback=cli_checks.output_dir,
        ),
    ],
    seed: Annotated[
        int, typer.Option(min=0, max=SEED_MAX, help="Seed for the order in which the permutations are updated.")
    ] = 0,
    max_iterations: Annotated[
        int,
        typer.Option(
            "--max-iterations",
            min=1,
            max=MAX_SWEEPS,
            help="At most this many sweeps over all permutations (it stops earlier when a sweep changes nothing).",
        ),
    ] = 100,
    overwrite: cli_checks.OverwriteOutput = False,
    device: Annotated[
        str,
        typer.Option(help="Where the matching runs: cpu, cuda, cuda:N or auto.", callback=cli_checks.device_here),
    ] = "cpu",
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Also read pytorch_model*.bin (loaded with weights_only=True).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")] = False,
) -> None:
    """Permute MODEL_B's hidden units to match MODEL_A (Git Re-Basin weight matching) and write it to OUT_DIR.

    For two models of one architecture trained from different initialisations (fine-tunes of one base are aligned already).

    The result computes the same function as MODEL_B; merging it with MODEL_A then averages matching units.

    Supports Llama, Mistral, Qwen2, Qwen3, Gemma 1-3 and Phi-3 checkpoints; others are refused.
    """
    from evomerge.align.run import align_models

    report = align_models(
        model_a,
        model_b,
        out_dir,
        seed=seed,
        max_iterations=max_iterations,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        device=device,
        progress=not quiet,
    )
    if not quiet:
        state = "converged" if report.converged else "stopped at --max-iterations"
        typer.echo(
            f"aligned {model_b} to {model_a}: {report.permutations} permutations, {report.sweeps} sweep{'s' if report.sweeps != 1 else ''} ({state}), "
            f"<A, B> {report.objective_before:.4g} -> {report.objective_after:.4g}; wrote {out_dir} in {report.seconds:.1f}s"
        )


def register(app: typer.Typer) -> None:
    app.command()(align)
