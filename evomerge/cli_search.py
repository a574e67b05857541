"""`evomerge run | front | export | dashboard`: the search service's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evomerge import cli_checks
from evomerge.cli_checks import PORT_MAX, SEED_MAX, TRIALS_MAX, WORKERS_MAX
from evomerge.errors import ConfigError, EvomergeError
from evomerge.offline import set_offline_defaults

STUDY_HELP = "A space file (space.yml), or a study name together with --storage."


def run(
    space_file: Annotated[Path, typer.Argument(help="The search space YAML (models, genome, objectives, search).")],
    n_trials: Annotated[
        int | None,
        typer.Option(min=1, max=TRIALS_MAX, help="Total finished trials for the study (overrides search.n_trials)."),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=0, help="Stop starting new trials after this many seconds (> 0).", callback=cli_checks.positive_seconds
        ),
    ] = None,
    storage: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL of the study database (overrides search.storage).")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="Where candidates are merged and scored: auto, cpu, cuda, cuda:N (overrides device:).",
            callback=cli_checks.device_spelling,
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, max=SEED_MAX, help="Sampler seed (overrides search.seed).")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=WORKERS_MAX,
            help="Candidates evaluated at once, by Ray actors when > 1 (overrides search.workers).",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show optuna and lm-eval logs.")] = False,
) -> None:
    """Run (or resume) an evolutionary merge search; ends with the Pareto front and next steps."""
    from rich.console import Console

    from evomerge.config.space import load_space
    from evomerge.search.report import front_table, parents_beaten
    from evomerge.search.runner import run_search
    from evomerge.store import display_url

    set_offline_defaults()
    space = load_space(space_file)
    updates = {}
    if storage:
        updates["storage"] = storage
    if seed is not None:
        updates["seed"] = seed
    if updates:
        space = space.model_copy(update={"search": space.search.model_copy(update=updates)})
    if device:
        space = space.model_copy(update={"device": device})
    console = Console()
    console.print(f"study [bold]{space.study_name}[/] in {display_url(space.storage_url)}")
    summary = run_search(
        space, n_trials=n_trials, timeout=timeout, progress=not quiet, verbose=verbose, workers=workers
    )
    for note in summary.notes:
        console.print(f"[yellow]{note}[/]")
    console.print(
        front_table(
            summary.objective_names,
            summary.front,
            summary.references,
            best=summary.best,
            title=f"Pareto front of {summary.study_name} ({summary.n_complete} complete, "
            + (f"{summary.n_pruned} stopped at a low rung, " if summary.n_pruned else "")
            + f"{summary.n_failed} failed, {summary.seconds:.0f}s)",
        )
    )
    parents = [m.name for m in space.models]
    winners = parents_beaten(summary.front, summary.references, parents)
    if winners:
        console.print(f"{len(winners)} merge(s) beat every parent on the mean over objectives.")
    if summary.best is not None:
        target = f"{space.source_path or space_file}"
        console.print("\nnext:")
        console.print(f"  evomerge front {target} --plot results/{space.study_name}_front.png")
        console.print(
            f"  evomerge export {target} exports/{space.study_name}-best        # trial {summary.best.number}, hash-verified"
        )
        console.print(f"  evomerge dashboard {target}")


def front(
    study: Annotated[str, typer.Argument(help=STUDY_HELP)],
    storage: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the study database.")] = None,
    top: Annotated[
        int, typer.Option(min=0, max=TRIALS_MAX, help="Also list the N best trials by weighted search score (0: none).")
    ] = 10,
    plot: Annotated[
        Path | None,
        typer.Option(help="Write a PNG (and an HTML page beside it) of the front.", callback=cli_checks.png_file),
    ] = None,
) -> None:
    """Show the Pareto front (parents as reference rows) and the top trials of a study."""
    from rich.console import Console

    from evomerge.search.calibration import estimator_fidelity, fidelity_line, is_full
    from evomerge.search.catalog import load_study_space
    from evomerge.search.fidelity import rung_summary
    from evomerge.search.front import FrontRow, compute_front, objective_values, pick_best, reference_rows, scalarize
    from evomerge.search.report import front_table
    from evomerge.store.states import Split, TrialStatus
    from evomerge.store.trial_store import TrialStore, display_url

    space = load_study_space(study, storage)
    with TrialStore(space.storage_url) as store:
        if store.study_info(space.study_name) is None:
            raise EvomergeError(
                f"no study '{space.study_name}' in {display_url(space.storage_url)} yet: run `evomerge run` first"
            )
        rows = compute_front(space, store)
        refs = reference_rows(space, store)
        best = pick_best(space, rows)
        names = [o.label for o in space.objectives]
        console = Console()
        console.print(front_table(names, rows, refs, best=best, title=f"Pareto front of {space.study_name}"))
        scores = store.scores(space.study_name, Split.SEARCH)
        ranked = []
        for record in store.trials(space.study_name, status=TrialStatus.COMPLETE):
            try:
                values = objective_values(space, scores.get(record.number, {}))
            except KeyError:
                continue
            label = f"trial {record.number}"
            if space.eval.estimator is not None and not is_full(space, scores.get(record.number)):
                label += " (estimated)"
            ranked.append(FrontRow(label, record.number, values, None, record.weights_hash))
        ranked.sort(key=lambda r: scalarize(space, r.search), reverse=True)
        if top and ranked:
            console.print(
                front_table(
                    names, ranked[:top], [], title=f"Top {min(top, len(ranked))} trials by weighted search score"
                )
            )
        if space.eval.estimator is not None:
            console.print(fidelity_line(estimator_fidelity(space, store), space.eval.estimator.method))
        for line in rung_summary(store, space):  # successive halving: each trial's rung
            console.print(line)
        failed = store.trials(space.study_name, status=TrialStatus.FAILED)
        if failed:
            console.print(f"{len(failed)} failed trial(s), e.g. trial {failed[-1].number}: {failed[-1].failure}")
        if plot is not None:
            from evomerge.search.plot import PageTable, plot_front
            from evomerge.search.report import front_cells, front_columns, has_selection

            held_out = has_selection([*rows, *refs])
            tables = [
                PageTable(  # the terminal's tables, cell for cell
                    f"Pareto front of {space.study_name}",
                    front_columns(names, held_out),
                    [front_cells(r, held_out, best=best) for r in [*refs, *rows]],
                    ["reference"] * len(refs) + ["best" if r is best else "" for r in rows],
                )
            ]
            if top and ranked:
                tables.append(
                    PageTable(
                        f"Top {min(top, len(ranked))} trials by weighted search score",
                        front_columns(names, False),
                        [front_cells(r, False) for r in ranked[:top]],
                    )
                )
            try:
                written = plot_front(
                    plot,
                    objective_names=names,
                    trials=[(r.number, r.search) for r in ranked],
                    front=[r.number for r in rows],
                    references={r.label: r.search for r in refs},
                    title=f"{space.study_name}: Pareto front"
                    + (f" (best: trial {best.number})" if best is not None else ""),
                    best=best.number if best is not None else None,
                    base=space.base_model.name
                    if space.base_model and space.base_model.name in {r.label for r in refs}
                    else None,
                    tables=tables,
                )
            except OSError as error:
                raise ConfigError(f"cannot write {plot}: {error.strerror or error}", field="--plot") from None
            for path in written:
                console.print(f"wrote {path}")


def export(
    study: Annotated[str, typer.Argument(help=STUDY_HELP)],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the checkpoint.", callback=cli_checks.output_dir)],
    trial: Annotated[
        int | None,
        typer.Option(min=0, max=2**31 - 1, help="Trial number (default: the best by held-out weighted score)."),
    ] = None,
    storage: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the study database.")] = None,
    device: Annotated[
        str,
        typer.Option(
            help="Where to run the merge: cpu, cuda, cuda:N or auto (use the device kind the trial was scored on).",
            callback=cli_checks.device_here,
        ),
    ] = "cpu",
    out_shard_size: Annotated[
        str,
        typer.Option(
            help="Maximum bytes per safetensors shard (K/M/B suffixes, decimal; at least 1).",
            callback=cli_checks.shard_size,
        ),
    ] = "5B",
    overwrite: cli_checks.OverwriteOutput = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the weights-hash check.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Export a trial as a HF checkpoint + mergekit YAML + model card, verified against the scored weights."""
    from evomerge.export import export_trial
    from evomerge.io.safetensors_io import parse_size
    from evomerge.search.catalog import load_study_space

    space = load_study_space(study, storage)
    report = export_trial(
        space,
        out_dir,
        trial=trial,
        device=device,
        max_shard_bytes=parse_size(out_shard_size),
        verify=not no_verify,
        overwrite=overwrite,
        progress=not quiet,
    )
    check = f"weights hash {report.weights_hash[:16]} matches the scored model" if report.verified else "not verified"
    typer.echo(f"exported trial {report.trial} to {report.out_dir} ({check})")


def dashboard(
    study: Annotated[str, typer.Argument(help=STUDY_HELP)],
    storage: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the study database.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; 0.0.0.0 exposes it).")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=1, max=PORT_MAX, help="Port to serve on (refused if another program holds it).")
    ] = 8080,
) -> None:
    """Serve optuna-dashboard over the study's database (Ctrl-C to stop)."""
    cli_checks.check_port_free(host, port)  # before the database is opened: a taken port is one line
    from optuna_dashboard import run_server

    from evomerge.search.catalog import load_study_space
    from evomerge.store.database import check_storage, database_errors

    if storage and not (study.endswith((".yml", ".yaml")) or Path(study).is_file()):
        url, label = storage, study  # any optuna study in that database, evomerge's or not
    else:
        space = load_study_space(study, storage)
        url, label = space.storage_url, space.study_name
    check_storage(url, must_exist=True)  # optuna-dashboard would create a missing database
    typer.echo(f"optuna-dashboard on http://{host}:{port}/ (study '{label}'); Ctrl-C to stop")
    try:
        # In process, so the database URL (and any password in it) never shows on a command line.
        with database_errors(url, "opening it in optuna-dashboard"):
            run_server(url, host=host, port=port)
    except KeyboardInterrupt:
        raise SystemExit(0) from None


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(front)
    app.command()(export)
    app.command()(dashboard)
