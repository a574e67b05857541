"""`evomerge moe`: a mixture of experts from dense models, read from a mergekit-moe YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evomerge import cli_checks
from evomerge.cli_checks import SEED_MAX


def moe(
    config: Annotated[
        Path,
        typer.Argument(
            help="A mergekit-moe YAML: base_model, experts (source_model, positive_prompts, negative_prompts), "
            "gate_mode (hidden, cheap_embed, random), experts_per_token, shared_experts, dtype, architecture."
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Where to write the MoE checkpoint (AutoModelForCausalLM loads it).", callback=cli_checks.output_dir
        ),
    ],
    seed: Annotated[
        int, typer.Option(min=0, max=SEED_MAX, help="Seed of the router rows for gate_mode: random (others ignore it).")
    ] = 0,
    overwrite: cli_checks.OverwriteOutput = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")] = False,
) -> None:
    """Assemble a mixture of experts: attention, norms and embeddings from base_model, one expert per listed model's MLP.

    Router rows, per layer: hidden = the base's last-token hidden state entering that layer, averaged over an expert's positive prompts minus its negative prompts, normalised (the base runs on the CPU); cheap_embed = the normalised sum of the prompts' token embeddings, the same in every layer; random = normal rows from --seed.

    Output: Mixtral for Llama/Mistral experts; Qwen2-MoE with one shared expert (architecture: qwen2_moe); Qwen3-MoE for Qwen3 experts. The result matches mergekit-moe 0.1.5 for the same YAML.
    """
    from evomerge.moe import build_moe

    report = build_moe(config, out_dir, overwrite=overwrite, seed=seed, progress=not quiet)
    if not quiet:
        typer.echo(
            f"wrote {report.out_dir}: {report.architecture}, {report.experts} experts in each of {report.layers} layers, "
            f"in {report.seconds:.1f}s"
        )


def register(app: typer.Typer) -> None:
    app.command()(moe)
