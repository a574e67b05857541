"""Before a driver loads any model: tie the trial store to the optuna study, and refuse a space
file that no longer fits the study it names.

evomerge's rows are keyed by study name, and optuna's tools (or optuna-dashboard's delete button)
remove a study without knowing about them. So the optuna study carries a uuid in its system attrs
(STUDY_UID_ATTR) and evomerge's study row carries the same one: rows whose uid is not the optuna
study's belong to a study that was deleted, and a new study under that name starts without them.

A space file edited under an existing study is checked against what the study already holds: the
objectives it was told, and every gene optuna has recorded (optuna refuses a gene whose kind or
choices change, half-way through a trial; here it is one line before anything is loaded).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from evomerge.config.space import SearchSpace
from evomerge.errors import ConfigError, EvomergeError
from evomerge.store.database import check_storage, display_url
from evomerge.store.tables import STUDY_UID_ATTR
from evomerge.store.trial_store import OptunaStudy, StudyInfo, TrialStore


def ensure_study_uid(study) -> str:
    """The optuna study's uid, written into its system attrs the first time evomerge runs it."""
    storage, study_id = study._storage, study._study_id
    uid = storage.get_study_system_attrs(study_id).get(STUDY_UID_ATTR)
    if not isinstance(uid, str) or not uid:
        uid = uuid.uuid4().hex
        storage.set_study_system_attr(study_id, STUDY_UID_ATTR, uid)
    return uid


def rows_belong(
    stored_uid: str | None, uid: str | None, stored_numbers: Iterable[int], optuna_numbers: Iterable[int]
) -> bool:
    """Whether evomerge's rows of a study name belong to the optuna study of that name now.

    With a uid on both sides they must match. Rows written before uids existed are kept when
    every trial they describe is still one of optuna's trials (a study created again after a
    delete starts from trial 0 and has fewer, or none, when its first run starts).
    """
    if stored_uid is not None:
        return stored_uid == uid
    stored, known = set(stored_numbers), set(optuna_numbers)
    return stored <= known and (not stored or bool(known))


def forget_stale_rows(store: TrialStore, study_name: str, uid: str, optuna_numbers: Iterable[int]) -> list[str]:
    """Remove evomerge's rows of an earlier, deleted study of this name; notes saying so."""
    info = store.study_info(study_name)
    records = store.trials(study_name)
    if info is None and not records:
        return []
    if rows_belong(info.uid if info else None, uid, (r.number for r in records), optuna_numbers):
        return []
    removed = store.delete_study(study_name, keep_lease=True)  # we hold it
    return [
        f"removed evomerge's rows of an earlier study named '{study_name}' ({removed} trials) that optuna no "
        "longer has (it was deleted with optuna's tools); this study starts without them"
    ]


def check_space_fits_study(space: SearchSpace, info: StudyInfo | None, recorded: dict, genes: dict) -> None:
    """ConfigError when the space changes what an existing study depends on.

    `recorded`: gene name -> the optuna distribution the study's trials used; `genes`: this
    space's gene name -> distribution.
    """
    from optuna.distributions import check_distribution_compatibility

    where = f"study '{space.study_name}' in {display_url(space.storage_url)}"
    advice = "set search.study_name to start a new study, or restore the earlier value"
    names = [o.label for o in space.objectives]
    if info is not None and info.objective_names and info.objective_names != names:
        raise ConfigError(
            f"{where} was run with objectives {info.objective_names}, this space has {names}; {advice}",
            file=space.source_path,
            field="objectives",
        )
    if info is not None and not space.multi_objective and info.objective_weights:
        weights = [float(o.weight) for o in space.objectives]
        if info.objective_weights != weights:
            raise ConfigError(
                f"{where} optimises the weighted score with weights {info.objective_weights}, this space has "
                f"{weights} (the scores already told would mean something else); {advice}",
                file=space.source_path,
                field="objectives",
            )
    if recorded and genes and set(recorded) != set(genes):
        dropped, added = sorted(set(recorded) - set(genes)), sorted(set(genes) - set(recorded))
        change = "; ".join(
            part
            for part in (
                f"its trials have genes this space no longer has ({_some(dropped)})" if dropped else "",
                f"this space adds genes its trials lack ({_some(added)})" if added else "",
            )
            if part
        )
        raise ConfigError(
            f"{where}: {change} (models, layer_granularity, filters or methods changed: its trials could no longer "
            f"be compared or exported); {advice}",
            file=space.source_path,
            field="genome",
        )
    for name, distribution in genes.items():
        earlier = recorded.get(name)
        if earlier is None:
            continue
        try:
            check_distribution_compatibility(earlier, distribution)
        except ValueError:
            raise ConfigError(
                f"{where} has trials with gene '{name}' as {_describe(earlier)}, this space gives "
                f"{_describe(distribution)} (optuna cannot change a gene's kind or choices within a study); {advice}",
                file=space.source_path,
                field="genome",
            ) from None


def recorded_distributions(study) -> dict:
    """gene name -> the distribution of its latest use in the study's trials."""
    recorded: dict = {}
    for trial in study.get_trials(deepcopy=False):
        recorded.update(trial.distributions)
    return recorded


def study_state(store: TrialStore, study_name: str) -> tuple[StudyInfo | None, OptunaStudy | None]:
    """The store's description of a study and optuna's study of that name (either may be None)."""
    return store.study_info(study_name), store.optuna_studies().get(study_name)


def check_study_readable(store: TrialStore, study_name: str) -> None:
    """For read-only commands: EvomergeError when the rows left of a study belong to a deleted one."""
    info, optuna_study = study_state(store, study_name)
    if info is None:
        return
    where = f"study '{study_name}' in {display_url(store.url)}"
    if optuna_study is None:
        if store.optuna_studies() or info.uid is not None:
            raise EvomergeError(
                f"{where} was deleted from optuna; only evomerge's rows of it are left (remove them with "
                f"`evomerge studies {display_url(store.url)} --delete {study_name}`)"
            )
        return  # a trial store without optuna's tables (written by the library alone)
    if info.uid is not None and optuna_study.uid != info.uid:
        raise EvomergeError(
            f"{where} is a new optuna study; evomerge's rows under that name are from an earlier study that was "
            "deleted (the next `evomerge run` of it removes them)"
        )


def _some(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _describe(distribution) -> str:
    choices = getattr(distribution, "choices", None)
    if choices is not None:
        return f"a choice of {list(choices)}"
    low, high = getattr(distribution, "low", None), getattr(distribution, "high", None)
    return f"{type(distribution).__name__.replace('Distribution', '').lower()} in [{low}, {high}]"


def check_space_against_database(space: SearchSpace, genome=None) -> str:
    """What `validate` checks of the study database, reading only: the storage opens (see
    `check_storage`) and, if the study exists, this space still fits it (directions, objectives,
    every gene optuna recorded; `genome`: the space's Genome, None to skip the genes).

    Returns a short description of the database for validate's "ok" line.
    """
    description = check_storage(space.storage_url)
    if description.startswith("a new"):
        return description
    with TrialStore(space.storage_url) as store:
        info, optuna_study = study_state(store, space.study_name)
        if optuna_study is None:
            return f"{description}; study '{space.study_name}' is new"
        if info is not None and info.uid is not None and info.uid != optuna_study.uid:
            info = None  # rows of a deleted namesake: the next run removes them
        directions, genes_json = store.optuna_study_genes(optuna_study.study_id)
    if directions and directions != space.directions:
        raise ConfigError(
            f"study '{space.study_name}' in {display_url(space.storage_url)} was created with directions {directions}, "
            f"this space needs {space.directions}: set search.study_name to start a new study",
            file=space.source_path,
            field="objectives",
        )
    from optuna.distributions import json_to_distribution

    recorded = {name: json_to_distribution(text) for name, text in genes_json.items()}
    check_space_fits_study(space, info, recorded, genome.distributions() if genome is not None else {})
    finished = optuna_study.states.get("COMPLETE", 0)
    return f"{description}; study '{space.study_name}' exists ({finished} complete trials) and this space fits it"
