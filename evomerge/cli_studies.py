"""`evomerge studies`: list, delete or rename the studies in a study database.

A study lives in two places in one database: optuna's tables and evomerge's (`evomerge_*`).
Deleting with optuna's tools removes only the first; this command handles both together, and
refuses to touch a study a live driver is running.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from evomerge.errors import EvomergeError


def studies(
    target: Annotated[
        str,
        typer.Argument(
            help="A space file (its study database) or a storage URL (sqlite:///x.db, postgresql+psycopg://...)."
        ),
    ],
    delete: Annotated[
        str | None,
        typer.Option("--delete", metavar="NAME", help="Delete this study: optuna's study and evomerge's rows."),
    ] = None,
    rename: Annotated[
        tuple[str, str] | None,
        typer.Option("--rename", metavar="OLD NEW", help="Rename a study (optuna's and evomerge's rows)."),
    ] = None,
    copy: Annotated[
        tuple[str, str] | None,
        typer.Option("--copy", metavar="OLD NEW", help="Copy a study under a new name (both sides)."),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
) -> None:
    """List the studies in a database with their trial counts; delete, rename or copy one."""
    from evomerge.store.database import check_storage, database_errors
    from evomerge.store.trial_store import TrialStore

    url = _storage_url(target)
    check_storage(url, must_exist=True)
    if sum(bool(action) for action in (delete, rename, copy)) > 1:
        raise EvomergeError("--delete, --rename and --copy: give one of them")
    with TrialStore(url) as store, database_errors(url):
        if delete:
            _delete(store, delete, yes)
        elif rename:
            _rename(store, *rename)
        elif copy:
            _copy(store, *copy)
        else:
            _list(store)


def _storage_url(target: str) -> str:
    from evomerge.store.database import is_sqlite_file

    path = Path(target)
    if path.is_file() and is_sqlite_file(path):  # the database file itself
        return f"sqlite:///{path.resolve()}"
    if path.suffix in (".yml", ".yaml") or path.is_file():
        from evomerge.config.space import load_space

        return load_space(path, check_paths=False).storage_url
    return target


def _overview(store) -> list[tuple[str, str, str, str]]:
    """(name, optuna trials, evomerge trials, state) for every study in the database."""
    from evomerge.store.lease import live_holder

    optuna_studies = store.optuna_studies()
    counts = store.trial_counts()
    rows = []
    for name in sorted({*optuna_studies, *store.studies()}):
        optuna_study = optuna_studies.get(name)
        info = store.study_info(name)
        ours = counts.get(name, {})
        if optuna_study is None:
            state = "optuna study deleted: only evomerge's rows are left"
        elif info is None and not ours:
            state = "optuna only (not run by evomerge)"
        elif info is not None and info.uid is not None and info.uid != optuna_study.uid:
            state = "evomerge's rows are from a deleted namesake (removed on the next run)"
        else:
            state = "ok"
        holder = live_holder(store, name)
        if holder is not None:
            state += f"; running: pid {holder.pid} on {holder.host}"
        optuna_text = (
            ", ".join(f"{n} {s.lower()}" for s, n in sorted(optuna_study.states.items())) if optuna_study else "-"
        )
        ours_text = ", ".join(f"{n} {s}" for s, n in sorted(ours.items())) or "-"
        rows.append((name, optuna_text or "0", ours_text, state))
    return rows


def _list(store) -> None:
    from rich.console import Console
    from rich.table import Table

    from evomerge.store.database import display_url

    rows = _overview(store)
    console = Console()
    if not rows:
        console.print(f"no studies in {display_url(store.url)}")
        return
    table = Table(title=f"studies in {display_url(store.url)}")
    for column in ("study", "optuna trials", "evomerge trials", "state"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _refuse_if_running(store, name: str, doing: str) -> None:
    from evomerge.store.lease import live_holder

    holder = live_holder(store, name)
    if holder is not None:
        raise EvomergeError(
            f"study '{name}' is being run by pid {holder.pid} on host {holder.host}; stop that run before you {doing} it"
        )


def _known(store, name: str) -> tuple[bool, bool]:
    """(optuna has a study of this name, evomerge has rows of it)."""
    return name in store.optuna_studies(), name in store.studies()


def _delete(store, name: str, yes: bool) -> None:
    from evomerge.store.database import display_url

    in_optuna, in_store = _known(store, name)
    if not in_optuna and not in_store:
        known = ", ".join(sorted({*store.optuna_studies(), *store.studies()})) or "none"
        raise EvomergeError(f"no study named '{name}' in {display_url(store.url)} (studies there: {known})")
    _refuse_if_running(store, name, "delete")
    if not yes:
        if not sys.stdin.isatty():
            raise EvomergeError(f"deleting study '{name}' removes all its trials: pass --yes to confirm")
        typer.confirm(f"delete study '{name}' and all its trials from {display_url(store.url)}?", abort=True)
    trials = 0
    if in_optuna:
        import optuna

        optuna_study = store.optuna_studies()[name]
        trials = sum(optuna_study.states.values())
        optuna.delete_study(study_name=name, storage=store.url)
    rows = store.delete_study(name)
    typer.echo(f"deleted study '{name}' ({trials} optuna trials, {rows} evomerge trial rows)")


def _check_new_name(store, old: str, new: str, doing: str) -> tuple[bool, bool]:
    """Where `old` lives (optuna, evomerge); EvomergeError unless `new` is a free, clean name."""
    from evomerge.store.database import display_url

    if not new.strip() or new != new.strip():
        raise EvomergeError(f"--{doing}: the new name {new!r} must be non-empty, without leading or trailing spaces")
    in_optuna, in_store = _known(store, old)
    if not in_optuna and not in_store:
        raise EvomergeError(f"no study named '{old}' in {display_url(store.url)}")
    if any(_known(store, new)):
        raise EvomergeError(f"a study named '{new}' already exists in {display_url(store.url)}; choose another name")
    _refuse_if_running(store, old, doing)
    return in_optuna, in_store


def _rename(store, old: str, new: str) -> None:
    from sqlalchemy import text

    in_optuna, _ = _check_new_name(store, old, new, "rename")

    def move(conn) -> None:
        if in_optuna:  # optuna has no rename; its study name is one column of one row
            conn.execute(text("UPDATE studies SET study_name = :new WHERE study_name = :old"), {"new": new, "old": old})
        store.rename_rows(conn, old, new)

    store.write(move)
    typer.echo(f"renamed study '{old}' to '{new}'; set search.study_name: {new} in its space file to resume it")


def _copy(store, old: str, new: str) -> None:
    """optuna's copy_study, then evomerge's rows; the copy gets its own study uid."""
    import uuid

    import optuna

    from evomerge.store.tables import STUDY_UID_ATTR

    in_optuna, _ = _check_new_name(store, old, new, "copy")
    uid = None
    if in_optuna:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna.copy_study(from_study_name=old, from_storage=store.url, to_storage=store.url, to_study_name=new)
        copied = optuna.load_study(study_name=new, storage=store.url)
        uid = uuid.uuid4().hex
        copied._storage.set_study_system_attr(copied._study_id, STUDY_UID_ATTR, uid)
    store.write(lambda conn: store.copy_rows(conn, old, new, uid=uid))
    typer.echo(f"copied study '{old}' to '{new}'; set search.study_name: {new} in a space file to run the copy")


def register(app: typer.Typer) -> None:
    app.command()(studies)
