"""The `evomerge` command: a thin typer layer over the library.

Every user mistake surfaces as one line (`error: file: field: what was expected`) and exit
status 2: usage errors (with click's usage line above), EvomergeError from the library, and the
file-system errors a user causes (a path that is missing, unwritable, on a full or read-only
disk). A bug is one line too, exit status 1, saying so; `--debug` (or EVOMERGE_DEBUG=1) shows
its traceback instead.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from evomerge import cli_checks
from evomerge.cli_checks import SEED_MAX, WORKERS_MAX
from evomerge.errors import EvomergeError
from evomerge.offline import set_offline_defaults
from evomerge.stop_signals import Terminated, exit_stopped, stop_on_sigterm

try:  # typer >= 0.20 bundles its own copy of click; its commands raise that copy's exceptions
    from typer._click import exceptions as click_exceptions
except ImportError:  # older typer runs on the click package
    from click import exceptions as click_exceptions
NO_ARGS_HELP = getattr(click_exceptions, "NoArgsIsHelpError", ())  # click >= 8.2: a bare group prints its help

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
from evomerge import cli_inspect  # noqa: E402

cli_inspect.register(app)
from evomerge import cli_align  # noqa: E402

cli_align.register(app)
from evomerge import cli_moe  # noqa: E402

cli_moe.register(app)
demo_app = typer.Typer(
    help="The built-in offline demo: a tiny model family with distinct skills.", no_args_is_help=True
)
app.add_typer(demo_app, name="demo")

_DEBUG = False


def _stderr(message: str) -> None:
    typer.secho(message, err=True, fg=typer.colors.RED if message.startswith("error") else None)


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="Show the full traceback of an error instead of one line (or set EVOMERGE_DEBUG=1)."
        ),
    ] = False,
) -> None:
    global _DEBUG
    _DEBUG = debug


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="A mergekit-style merge YAML (models: or slices:).")],
    out_dir: Annotated[
        Path, typer.Argument(help="Where to write the merged Hugging Face checkpoint.", callback=cli_checks.output_dir)
    ],
    device: Annotated[
        str, typer.Option(help="Where the merge math runs: cpu, cuda, cuda:N or auto.", callback=cli_checks.device_here)
    ] = "cpu",
    seed: Annotated[
        int,
        typer.Option(min=0, max=SEED_MAX, help="Seed for DARE/DELLA masks (a pure function of seed and tensor name)."),
    ] = 0,
    out_shard_size: Annotated[
        str,
        typer.Option(
            "--out-shard-size",
            help="Maximum bytes per safetensors shard (K/M/B suffixes, decimal; at least 1).",
            callback=cli_checks.shard_size,
        ),
    ] = "5B",
    workers: Annotated[
        int | None,
        typer.Option(min=1, max=WORKERS_MAX, help="Tensors merged in parallel (default: min(4, CPU cores))."),
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Also read pytorch_model*.bin (loaded with weights_only=True).")
    ] = False,
    allow_crimes: Annotated[
        bool, typer.Option("--allow-crimes", help="Allow merging models of different architectures.")
    ] = False,
    copy_tokenizer: Annotated[
        bool,
        typer.Option(
            "--copy-tokenizer/--no-copy-tokenizer",
            help="Copy tokenizer and generation config (a tokenizer source's built tokenizer is always written, as mergekit does).",
        ),
    ] = True,
    model_card: Annotated[
        bool, typer.Option("--model-card/--no-model-card", help="Write a README.md model card.")
    ] = True,
    overwrite: cli_checks.OverwriteOutput = False,
    intermediate_dir: Annotated[
        Path | None,
        typer.Option(
            help="Multi-document (mergekit-multi) files: keep each named part in DIR/NAME (default: staged under OUT_DIR's staging folder, deleted after).",
            callback=cli_checks.output_dir,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Merge models once, from a mergekit YAML: same format, same math as `mergekit-yaml`.

    A file of several YAML documents is a `mergekit-multi` recipe: each named document is merged
    in order and later documents can use its name as a model; the unnamed last one is the output.

    `fisher` and `regmean` need a `data:` section (lm-eval tasks, examples per model): their
    per-model statistics are computed once and cached in its `cache_dir`, by default
    `.evomerge-stats` beside OUT_DIR, and reused by later merges.
    """
    from evomerge.io.safetensors_io import parse_size
    from evomerge.merge.oneshot import merge_file

    shard_bytes = parse_size(out_shard_size)
    report = merge_file(
        config,
        out_dir,
        seed=seed,
        device=device,
        max_shard_bytes=shard_bytes,
        workers=workers,
        allow_pickle=allow_pickle,
        allow_crimes=allow_crimes,
        copy_tokenizer=copy_tokenizer,
        model_card=model_card,
        overwrite=overwrite,
        intermediate_dir=intermediate_dir,
        progress=not quiet,
    )
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
        bool, typer.Option("--schema-only", help="Space files: check fields only, not models, tasks or storage.")
    ] = False,
    scan: Annotated[
        bool | None,
        typer.Option(
            "--scan/--no-scan", help="Read every source tensor for NaN/Inf (default: when the sources total <= 2 GB)."
        ),
    ] = None,
) -> None:
    """Check a merge YAML or a space file and everything a merge or `run` will need, without doing either.

    Space files: fields, models (every tensor header, against its file), genome, filters, sampler
    options, storage, lm-eval tasks and metrics, and NaN/Inf in the sources where cheap.
    """
    from evomerge.config.mergekit_yaml import load_merge_documents, load_yaml_documents
    from evomerge.config.space import is_space_file, load_space
    from evomerge.data_stats.for_plan import check_data
    from evomerge.preflight import plan_documents, preflight_merge, preflight_space
    from evomerge.store import display_url

    documents = load_yaml_documents(config)
    if len(documents) == 1 and is_space_file(documents[0]):
        space = load_space(config, check_paths=not schema_only)
        detail = f"{len(space.models)} models, {len(space.objectives)} objectives, sampler {space.search.sampler}"
        if not schema_only:
            set_offline_defaults()
            for line in preflight_space(space, scan=scan).checks:
                typer.echo(f"  {line}")
        typer.echo(
            f"{config}: ok (search space: {detail}; study '{space.study_name}' in {display_url(space.storage_url)})"
        )
        return

    merge_documents = load_merge_documents(config)
    plans = plan_documents(merge_documents, config_path=config, allow_pickle=allow_pickle, allow_crimes=allow_crimes)
    for line in check_data(merge_documents, config):  # what `merge` checks before merging
        typer.echo(f"  {line}")
    for line in preflight_merge(plans, scan=scan, allow_pickle=allow_pickle, file=config).checks:
        typer.echo(f"  {line}")
    plan = plans[-1]  # the output; in a mergekit-multi file later documents were planned against the earlier parts
    typer.echo(
        f"{config}: ok ({', '.join(plan.method_names)}; {len(plan.models)} models; {len(plan.tensors)} output tensors; "
        f"{plan.num_hidden_layers} layers; {plan.output_bytes() / 1e6:.1f} MB out)"
    )


@app.command()
def methods() -> None:
    """List the merge methods, their parameters (defaults in brackets; * = required) and the values they take."""
    from evomerge.merge.methods import METHODS

    def fmt(params):
        return ", ".join(f"{k}*" if v is None else f"{k} [{v}]" for k, v in params.items()) or "-"

    for spec in METHODS.values():
        typer.echo(f"{spec.name:18} {spec.doc}")
        scopes = f"global: {fmt(spec.global_params)}; per model: {fmt(spec.model_params)}"
        typer.echo(f"{'':18}   base: {spec.base}; {scopes}")
        bounded = [p for p in spec.params if p.valid.bounded]
        if bounded:
            ranges = ", ".join(
                f"{p.name} in {p.valid.describe()}" + (" (more: kept, with a warning)" if p.valid.lenient_high else "")
                for p in bounded
            )
            typer.echo(f"{'':18}   values: {ranges}")


@demo_app.command("build")
def demo_build(
    out_dir: Annotated[
        Path, typer.Argument(help="Where to write the demo family.", callback=cli_checks.output_dir)
    ] = Path("demo_models"),
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed for data and training.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Build the tiny offline demo family: a base and fine-tunes with distinct skills (reused if present)."""
    from evomerge.demo import build_demo_family

    set_offline_defaults()
    family = build_demo_family(out_dir, seed=seed, progress=not quiet)
    typer.echo(f"demo family in {family.root}: base + {', '.join(family.finetunes)}")


@demo_app.command("search")
def demo_search(
    models_dir: Annotated[
        Path, typer.Option(help="Demo family directory (built first if missing).", callback=cli_checks.output_dir)
    ] = Path("demo_models"),
    space_file: Annotated[Path, typer.Option("--space", help="The demo search space.")] = Path(
        "search_spaces/demo.yml"
    ),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """The main job: build the demo family if needed, then run the demo search to completion."""
    from evomerge.demo import build_demo_family

    set_offline_defaults()
    family = build_demo_family(models_dir, progress=not quiet)
    typer.echo(f"demo family in {family.root}: base + {', '.join(family.finetunes)}")
    cli_search.run(space_file, quiet=quiet)


# What a user's environment causes (a path missing, unwritable, on a full or read-only disk, a
# taken port), as opposed to an OSError from a bug: one line naming the path, exit status 2.
USER_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENOSPC,
        errno.EROFS,
        errno.EDQUOT,
        errno.ENAMETOOLONG,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ELOOP,
        errno.EFBIG,
        errno.EADDRINUSE,
        errno.EADDRNOTAVAIL,
        errno.EMFILE,
        errno.EXDEV,
    }
)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_error_line(exc: OSError) -> str:
    where = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
    reason = exc.strerror or _one_line(exc)
    hint = {
        errno.ENOSPC: "; free some space or write somewhere else",
        errno.EDQUOT: "; free some space or write somewhere else",
        errno.EROFS: "; write somewhere else",
    }.get(exc.errno, "")
    return f"error: {' -> '.join(where) + ': ' if where else ''}{reason}{hint}"


def _bug_line(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    inner = frames[-1] if frames else None
    where = f" at {Path(inner.filename).name}:{inner.lineno}" if inner else ""
    message = _one_line(exc)[:300]
    return (
        f"error: internal error (a bug in evomerge, not in your input): {type(exc).__name__}: {message}{where}; "
        "run again with `evomerge --debug ...` (or EVOMERGE_DEBUG=1) for the traceback and please report it"
    )


def _show_usage_error(exc: click_exceptions.UsageError) -> None:
    """click's usage line and help hint, then our one `error:` line (not click's `Error:` block)."""
    ctx = exc.ctx
    if ctx is not None:
        typer.echo(ctx.get_usage(), err=True)
        if ctx.command.get_help_option(ctx) is not None:
            typer.echo(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.", err=True)
    _stderr(f"error: {_one_line(exc.format_message())}")


def main(argv: list[str] | None = None) -> None:
    """The console script. Exit status: 0 done, 2 a user mistake (one line), 1 a bug (one line
    saying so; the traceback with --debug or EVOMERGE_DEBUG=1), 130 interrupted, 143 SIGTERM."""
    global _DEBUG
    _DEBUG = os.environ.get("EVOMERGE_DEBUG", "") not in ("", "0")
    try:
        with stop_on_sigterm():
            status = app(args=argv, standalone_mode=False, prog_name="evomerge")
    except Terminated as exc:
        _stderr(str(exc))
        exit_stopped(exc)
    except NO_ARGS_HELP as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click_exceptions.UsageError as exc:
        _show_usage_error(exc)
        sys.exit(2)
    except click_exceptions.ClickException as exc:
        _stderr(f"error: {_one_line(exc.format_message())}")
        sys.exit(exc.exit_code)
    except typer.Abort:
        _stderr("aborted")
        sys.exit(1)
    except EvomergeError as exc:
        if _DEBUG:
            raise
        _stderr(f"error: {_one_line(exc)}")
        sys.exit(2)
    except KeyboardInterrupt:
        _stderr("interrupted")
        sys.exit(130)
    except OSError as exc:
        if _DEBUG:
            raise
        caused_by_user = exc.errno in USER_ERRNOS
        _stderr(_os_error_line(exc) if caused_by_user else _bug_line(exc))
        sys.exit(2 if caused_by_user else 1)
    except UnicodeDecodeError as exc:
        if _DEBUG:
            raise
        _stderr(
            f"error: a file given to evomerge is not UTF-8 text ({exc.reason} at byte {exc.start}); pass a text YAML file"
        )
        sys.exit(2)
    except Exception as exc:
        if _DEBUG:
            raise
        _stderr(_bug_line(exc))
        sys.exit(1)
    if isinstance(status, int) and status:  # typer.Exit(code) and Ctrl-C come back as a status
        if status == 130:
            _stderr("interrupted")
        sys.exit(status)


if __name__ == "__main__":
    main()
