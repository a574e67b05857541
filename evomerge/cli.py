"""The `evomerge` command: a thin typer layer over the library.

Every user mistake surfaces as one line (`error: file: field: what was expected`) and exit
status 2; tracebacks are for bugs (or `--debug`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from evomerge.errors import EvomergeError

app = typer.Typer(
    name="evomerge",
    help="Evolutionary search over model-merge recipes (mergekit-compatible merges, optuna search, lm-eval scoring).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
from evomerge import cli_search  # noqa: E402

cli_search.register(app)
from evomerge import cli_studies  # noqa: E402

cli_studies.register(app)
demo_app = typer.Typer(help="The built-in offline demo: a tiny model family with distinct skills.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")

_DEBUG = False


def _stderr(message: str) -> None:
    typer.secho(message, err=True, fg=typer.colors.RED if message.startswith("error") else None)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
) -> None:
    global _DEBUG
    _DEBUG = debug


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="A mergekit-style merge YAML (models: or slices:).")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the merged Hugging Face checkpoint.")],
    device: Annotated[str, typer.Option(help="Where the merge math runs: cpu, cuda, cuda:1 ...")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed for DARE/DELLA masks (a pure function of seed and tensor name).")] = 0,
    out_shard_size: Annotated[
        str, typer.Option("--out-shard-size", help="Maximum bytes per safetensors shard (K/M/B suffixes, decimal).")
    ] = "5B",
    workers: Annotated[
        Optional[int], typer.Option(help="Tensors merged in parallel (default: min(4, CPU cores)).")
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Also read pytorch_model*.bin (loaded with weights_only=True).")
    ] = False,
    allow_crimes: Annotated[
        bool, typer.Option("--allow-crimes", help="Allow merging models of different architectures.")
    ] = False,
    copy_tokenizer: Annotated[
        bool, typer.Option("--copy-tokenizer/--no-copy-tokenizer", help="Copy tokenizer and generation config.")
    ] = True,
    model_card: Annotated[bool, typer.Option("--model-card/--no-model-card", help="Write a README.md model card.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into OUT_DIR even if it holds a checkpoint.")] = False,
    intermediate_dir: Annotated[
        Optional[Path],
        typer.Option(help="Multi-document (mergekit-multi) files: keep the named parts here (default: deleted after)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Merge models once, from a mergekit YAML: same format, same math as `mergekit-yaml`.

    A file of several YAML documents is a `mergekit-multi` recipe: each named document is merged
    in order and later documents can use its name as a model; the unnamed last one is the output.
    """
    import shutil

    from evomerge.config.mergekit_yaml import load_merge_documents
    from evomerge.io.safetensors_io import parse_size
    from evomerge.merge.engine import run_merge
    from evomerge.merge.planner import plan_merge

    shard_bytes = parse_size(out_shard_size)
    _check_out_dir(out_dir, overwrite)
    _check_device(device)
    documents = load_merge_documents(config)
    if len(documents) > 1 and documents[-1].name:
        raise EvomergeError(f"{config}: the last document is named '{documents[-1].name}'; leave the final merge unnamed")
    parts_dir = intermediate_dir or out_dir / ".evomerge-parts"
    named: dict[str, Path] = {}
    for document in documents:
        target = parts_dir / document.name if document.name else out_dir
        plan = plan_merge(
            document, config_path=config, seed=seed, allow_pickle=allow_pickle, allow_crimes=allow_crimes, named_models=named
        )
        report = run_merge(
            plan,
            target,
            device=device,
            max_shard_bytes=shard_bytes,
            workers=workers,
            progress=not quiet,
            allow_pickle=allow_pickle,
            copy_tokenizer_files=copy_tokenizer,
            write_card=model_card,
        )
        if document.name:
            named[document.name] = target
    if named and intermediate_dir is None:
        shutil.rmtree(parts_dir, ignore_errors=True)
    if not quiet:
        typer.echo(
            f"merged {report.num_tensors} tensors ({report.output_bytes / 1e6:.1f} MB, {report.shards} shard"
            f"{'s' if report.shards != 1 else ''}) into {out_dir} in {report.seconds:.1f}s"
        )


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="A mergekit-style merge YAML, or a search space file.")],
    allow_crimes: Annotated[bool, typer.Option("--allow-crimes", help="Allow different architectures.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Also read pytorch_model*.bin.")] = False,
    schema_only: Annotated[
        bool, typer.Option("--schema-only", help="Space files: check fields only, not that model/task paths exist.")
    ] = False,
) -> None:
    """Check a merge YAML or a space file and the models it names, without merging or searching."""
    from evomerge.config.mergekit_yaml import load_merge_config, load_yaml_file
    from evomerge.config.space import is_space_file, load_space
    from evomerge.merge.planner import plan_merge
    from evomerge.store import display_url

    if is_space_file(load_yaml_file(config)):
        space = load_space(config, check_paths=not schema_only)
        detail = f"{len(space.models)} models, {len(space.objectives)} objectives, sampler {space.search.sampler}"
        if not schema_only:
            from evomerge.search.genome import Genome

            genome = Genome(space)
            detail += f", {len(genome.distributions())} genes over {genome.num_groups} layer groups"
        typer.echo(f"{config}: ok (search space: {detail}; study '{space.study_name}' in {display_url(space.storage_url)})")
        return

    plan = plan_merge(load_merge_config(config), config_path=config, allow_crimes=allow_crimes, allow_pickle=allow_pickle)
    typer.echo(
        f"{config}: ok ({', '.join(plan.method_names)}; {len(plan.models)} models; {len(plan.tensors)} output tensors; "
        f"{plan.num_hidden_layers} layers; {plan.output_bytes() / 1e6:.1f} MB out)"
    )


@app.command()
def methods() -> None:
    """List the merge methods and their parameters (defaults in brackets; * = required)."""
    from evomerge.merge.methods import METHODS

    for spec in METHODS.values():
        def fmt(params):
            return ", ".join(f"{k}*" if v is None else f"{k} [{v}]" for k, v in params.items()) or "-"

        typer.echo(f"{spec.name:18} {spec.doc}")
        typer.echo(f"{'':18}   base: {spec.base}; global: {fmt(spec.global_params)}; per model: {fmt(spec.model_params)}")


@demo_app.command("build")
def demo_build(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the demo family.")] = Path("demo_models"),
    seed: Annotated[int, typer.Option(help="Seed for data and training.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Build the tiny offline demo family: a base and fine-tunes with distinct skills (reused if present)."""
    from evomerge.demo import build_demo_family

    _offline_env()
    family = build_demo_family(out_dir, seed=seed, progress=not quiet)
    typer.echo(f"demo family in {family.root}: base + {', '.join(family.finetunes)}")


@demo_app.command("search")
def demo_search(
    models_dir: Annotated[Path, typer.Option(help="Demo family directory (built first if missing).")] = Path("demo_models"),
    space_file: Annotated[Path, typer.Option("--space", help="The demo search space.")] = Path("search_spaces/demo.yml"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """The main job: build the demo family if needed, then run the demo search to completion."""
    from evomerge.demo import build_demo_family

    _offline_env()
    family = build_demo_family(models_dir, progress=not quiet)
    typer.echo(f"demo family in {family.root}: base + {', '.join(family.finetunes)}")
    cli_search.run(space_file, quiet=quiet)


_offline_env = cli_search._offline_env


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise EvomergeError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and not overwrite and any(out_dir.glob("*.safetensors")):
        raise EvomergeError(f"{out_dir}: already holds a checkpoint; pass --overwrite or choose another directory")


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise EvomergeError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EvomergeError(f"--device {device}: no CUDA device is available on this machine; use --device cpu")


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except EvomergeError as exc:
        if _DEBUG:
            raise
        _stderr(f"error: {exc}")
        sys.exit(2)
    except (KeyboardInterrupt,):
        _stderr("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
