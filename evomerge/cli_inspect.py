"""`evomerge inspect`: the pre-merge check of a family's task vectors (a thin layer over evomerge.inspect)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evomerge import cli_checks
from evomerge.cli_checks import SEED_MAX
from evomerge.errors import ConfigError, EvomergeError
from evomerge.inspect.defaults import DEFAULT_DENSITIES, DEFAULT_ENTRIES


def _png(path: Path | None) -> Path | None:
    cli_checks.output_file(path)
    if path is not None and path.suffix.lower() != ".png":
        raise EvomergeError(f"--plot {path}: expected a .png file name")
    return path


def _densities(values: list[float] | None) -> list[float] | None:
    for value in values or ():
        if not 0 < value <= 1:
            raise EvomergeError(f"--density: expected a share of entries in (0, 1], got {value}")
    return values


def inspect(
    config: Annotated[
        Path, typer.Argument(help="A space file (models + base_model) or a mergekit merge YAML with a base_model.")
    ],
    sample: Annotated[
        int,
        typer.Option(
            min=0,
            help="Entries read per tensor: tensors up to this size are read whole, larger ones sampled "
            "(seeded, stratified spans, the same positions in every model); 0 reads every entry.",
        ),
    ] = DEFAULT_ENTRIES,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the sampled positions.")] = 0,
    density: Annotated[
        list[float] | None,
        typer.Option(
            "--density",
            help="A TIES density whose trimmed overlap and kept energy to report (repeat for several; "
            f"default {', '.join(f'{d:g}' for d in DEFAULT_DENSITIES)}).",
            callback=_densities,
        ),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(
            min=1, help="Layers per layer group (default: the space genome's layer_granularity, else ~4 groups)."
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Write a PNG heatmap of the pairwise cosine, overall and per layer group.", callback=_png),
    ] = None,
    json_file: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Write every statistic (per layer group and tensor kind) and the reading as JSON.",
            callback=cli_checks.output_file,
        ),
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Also read pytorch_model*.bin (loaded with weights_only=True).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Before merging: how the fine-tunes' task vectors relate, and a genome range to start a search from.

    Pairwise cosine of the task vectors (fine-tune - base) overall, per layer group and per tensor
    kind; each one's norm relative to the base; the sign-conflict rate of each pair; how much their
    TIES-trimmed entries overlap at a few densities. Then the merge guides' reading of those numbers
    and a `genome:` snippet to paste into a space file.
    """
    from rich.console import Console

    from evomerge.inspect import advise, inspect_file
    from evomerge.inspect.report import print_report, write_json
    from evomerge.inspect.sampling import Sampling
    from evomerge.progress import progress_bar

    options = {"sampling": Sampling(entries=sample, seed=seed)}
    if density:
        options["densities"] = tuple(sorted(set(density)))
    if group_size is not None:
        options["group_size"] = group_size
    if allow_pickle:
        options["allow_pickle"] = True
    with progress_bar(None, "reading tensors", enabled=not quiet, unit="tensors") as bar:
        inspection = inspect_file(
            config, progress=lambda done, total: bar.update(completed=done, total=total), **options
        )
    advice = advise(inspection)
    console = Console()
    print_report(inspection, advice, console)
    for path, write, field in ((plot, "plot", "--plot"), (json_file, "json", "--json")):
        if path is None:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if write == "plot":
                from evomerge.inspect.plot import plot_cosine

                plot_cosine(inspection, path)
            else:
                write_json(inspection, advice, path)
        except OSError as error:
            raise ConfigError(f"cannot write {path}: {error.strerror or error}", field=field) from None
        console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command()(inspect)
