"""Find a study from what the user typed: a space file, or a study name plus a storage URL."""

from __future__ import annotations

import math
from pathlib import Path

from evomerge.config.space import SearchSpace, load_space, parse_space
from evomerge.errors import EvomergeError


def load_study_space(study_or_space: str | Path, storage: str | None = None) -> SearchSpace:
    """The SearchSpace of a study: from its space file, or rebuilt from the copy in the database.

    Read-only: a database that does not exist is not created (SQLite files included), and rows
    left by a study deleted with optuna's tools are refused rather than shown.
    """
    from evomerge.search.study_setup import check_space_against_database, check_study_readable
    from evomerge.store.database import check_storage, is_sqlite_file
    from evomerge.store.trial_store import TrialStore

    path = Path(study_or_space)
    if path.is_file() and is_sqlite_file(path):
        raise EvomergeError(
            f"{path} is a study database, not a space file: pass the space file, or the study's name with "
            f"--storage sqlite:///{path.resolve()} (`evomerge studies {path}` lists the names)"
        )
    if path.suffix in (".yml", ".yaml") or path.is_file():
        space = load_space(path)
        if storage:
            space = space.model_copy(update={"search": space.search.model_copy(update={"storage": storage})})
        check_storage(space.storage_url)
        with TrialStore(space.storage_url) as store:
            check_study_readable(store, space.study_name)
        # Objectives or genes edited since the study ran: one line here, not a KeyError or a
        # hash mismatch in export.
        check_space_against_database(space, _genome_or_none(space))
        return space
    if not storage:
        raise EvomergeError(
            f"'{study_or_space}' is not a space file; to open a study by name pass --storage URL "
            "(e.g. sqlite:///path/demo.db)"
        )
    check_storage(storage, must_exist=True)
    with TrialStore(storage) as store:
        info = store.study_info(str(study_or_space))
        if info is None:
            known = ", ".join(store.studies()) or "none"
            from evomerge.store import display_url

            raise EvomergeError(f"no study named '{study_or_space}' in {display_url(storage)} (studies there: {known})")
        check_study_readable(store, str(study_or_space))
    import yaml

    base_dir = Path(info.space_path).parent if info.space_path else Path.cwd()
    space = parse_space(
        yaml.safe_load(info.space_yaml),
        base_dir=base_dir,
        source=info.space_path or "stored space",
        text=info.space_yaml,
    )
    search = space.search.model_copy(update={"storage": storage, "study_name": str(study_or_space)})
    return space.model_copy(
        update={"search": search, "source_path": Path(info.space_path) if info.space_path else None}
    )


def _genome_or_none(space: SearchSpace):
    """The space's genome for checking it against its study, or None when the models it names
    cannot be read here (reading the front needs none)."""
    from evomerge.genome.kinds import make_genome

    try:
        return make_genome(space)
    except EvomergeError:
        return None


def fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
