"""The IRT estimator's study-level steps: calibrate once, re-score the front on full sets, report fidelity.

Calibration (before the first trial): the reference models and `eval.estimator.calibration`
space-filling merges (optuna's QMC sampler, scrambled Sobol, seeded by the search seed) are scored
on every item; the merges become trials of the study with those full-set scores, and the fit and
the anchors go to the study's user attribute `evomerge_irt`, so a resumed study reads them back
and never calibrates again. Trials are then scored on the anchors
only. Estimates never decide the best: after the search, the front's trials (and
`eval.estimator.check` random others, for an unbiased fidelity figure) are re-scored on the full
set until the front holds only full-set values. A re-scored trial keeps its estimates beside the
full values (`metric|gp_irt` ..., `metric|full`), which is where the fidelity report reads them.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from evomerge.evaluate.estimator import FULL, METHODS, IrtCalibration, calibrate, estimate_key, fidelity
from evomerge.search.front import compute_front, objective_values, told_values
from evomerge.search.loop import stored_fields

if TYPE_CHECKING:
    from evomerge.config.space import SearchSpace
    from evomerge.genome.protocol import Genome
    from evomerge.store.protocol import TrialReader, TrialRecorder

log = logging.getLogger("evomerge.search")

CALIBRATION_ATTR = "evomerge_irt"
FIDELITY_ATTR = "evomerge_irt_fidelity"
# A trial that reproduces a calibration model (a parent alone) carries this score row.
CALIBRATED_TASK, CALIBRATED = "evomerge_irt", "calibration_model"


def space_filling_genomes(genome: Genome, count: int, seed: int) -> list[dict[str, Any]]:
    """`count` genomes spread over the genome's space: scrambled Sobol points via optuna's QMC sampler."""
    return [params for params, _ in space_filling_points(genome, count, seed)]


def space_filling_points(genome: Genome, count: int, seed: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """`space_filling_genomes` with each genome's optuna distributions (to record it as a trial)."""
    import warnings

    import optuna

    if count <= 0:
        return []
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():  # QMCSampler is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.QMCSampler(
                qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False
            )
        study = optuna.create_study(sampler=sampler)
        points = []
        for _ in range(count):
            trial = study.ask()
            params = genome.suggest(trial)
            points.append((params, dict(study._storage.get_trial(trial._trial_id).distributions)))
            study.tell(trial, 0.0)  # QMC infers the space from the first complete trial
    finally:
        optuna.logging.set_verbosity(verbosity)
    return points


def objective_metrics(space: SearchSpace) -> dict[str, str]:
    """task -> metric of the objectives (the estimator's tasks)."""
    return {o.task: o.metric for o in space.objectives}


def stored_calibration(study) -> IrtCalibration | None:
    """The calibration a study holds (user attribute CALIBRATION_ATTR), or None before it is made."""
    data = study.user_attrs.get(CALIBRATION_ATTR)
    return IrtCalibration.from_json(data) if data else None


def load_or_calibrate(
    study,
    pool,
    space: SearchSpace,
    genome: Genome,
    *,
    evaluate_all: Callable[..., dict[Any, Any]],
    on_phase: Callable[[int], Any] | None = None,
    on_done: Callable[[], Any] | None = None,
    on_merge: Callable[[dict[str, Any], dict[str, Any], Any], Any] | None = None,
    on_reference: Callable[[str, Any], Any] | None = None,
) -> IrtCalibration:
    """The study's calibration: read back, or made now (references and K merges scored on every item).

    `on_merge(params, distributions, result)` gets each scored merge before the calibration is
    stored (the loop records them as trials: full-set scores, nothing wasted); `on_reference(name,
    scores)` each reference model's scores (the loop records them: they are not scored twice).
    """
    stored = stored_calibration(study)
    if stored is not None:
        return stored
    options = space.eval.estimator
    points = space_filling_points(genome, options.calibration, space.search.seed)
    merges = [params for params, _ in points]
    references = [*([genome.base] if genome.base else []), *genome.finetunes]
    if on_phase is not None:
        on_phase(len(references) + len(merges))
    subjects = {}
    for name in references:
        scores, item_scores = pool.score_reference_items(name, "search")
        subjects[name] = item_scores
        if on_reference is not None:
            on_reference(name, scores)
        if on_done is not None:
            on_done()
    jobs = [(f"merge {i}", params) for i, params in enumerate(merges)]
    outcomes = evaluate_all(pool, jobs, "search", on_done=on_done, per_item=True)
    for i, (params, distributions) in enumerate(points):
        outcome = outcomes[f"merge {i}"]
        if outcome.error is not None:
            log.warning("calibration merge %d failed, left out: %s", i, outcome.error)
            continue
        subjects[f"merge {i}"] = outcome.result.item_scores
        if on_merge is not None:
            on_merge(params, distributions, outcome.result)
    calibration = calibrate(
        subjects,
        objective_metrics(space),
        anchors=options.anchors,
        method=options.method,
        cluster_on=options.cluster_on,
        seed=space.search.seed,
    )
    study.set_user_attr(CALIBRATION_ATTR, calibration.to_json())
    log.info(
        "IRT estimator calibrated on %d models: %d of %d items per candidate",
        len(subjects),
        calibration.anchor_count(),
        calibration.item_count(),
    )
    return calibration


def record_calibration_trial(
    study, store: TrialRecorder, space: SearchSpace, genome: Genome, params, distributions, result
) -> None:
    """A calibration merge as a complete trial (seed: calibration) with its full-set scores: stored, then told.

    Its number is the count of the study's trials (the lease makes this driver the only one adding).
    """
    from optuna.trial import create_trial

    from evomerge.search import annotate

    values = objective_values(space, result.scores)
    if any(math.isnan(v) for v in values):
        return
    number = len(study.get_trials(deepcopy=False))
    told = told_values(space, values)
    store.start_trial(space.study_name, number, params, worker=result.worker or None)
    store.finish_trial(
        space.study_name,
        number,
        scores=result.scores,
        values=told,
        **stored_fields(result),
    )
    attrs = annotate.search_attrs(
        [o.label for o in space.objectives],
        values,
        methods=annotate.methods_line(genome, params),
        weights_hash=result.weights_hash,
        role_text="IRT calibration merge (scored on every item)",
        seconds={"merge": result.merge_seconds, "eval": result.eval_seconds},
    )
    study.add_trial(
        create_trial(
            params=params, distributions=distributions, values=told, user_attrs={**attrs, "seed": "calibration"}
        )
    )


def parents_alone(study) -> list[int]:
    """The enqueued parents-alone trials: they reproduce calibration models."""
    return [
        t.number for t in study.get_trials(deepcopy=False) if str(t.user_attrs.get("seed", "")).startswith("parent:")
    ]


def full_marked(space: SearchSpace, scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Full-set scores plus each objective's value again under `metric|full` (the re-scored mark)."""
    marked = {task: dict(metrics) for task, metrics in scores.items()}
    for objective in space.objectives:
        if objective.metric in marked.get(objective.task, {}):
            marked[objective.task][estimate_key(objective.metric, FULL)] = marked[objective.task][objective.metric]
    return marked


def is_full(space: SearchSpace, scores: Mapping[str, Mapping[str, float]] | None) -> bool:
    return bool(scores) and all(
        estimate_key(o.metric, FULL) in scores.get(o.task, {})
        or estimate_key(o.metric, "anchor") not in scores.get(o.task, {})
        for o in space.objectives
    )


def rescore_front(
    space: SearchSpace,
    store: TrialRecorder,
    pool,
    *,
    evaluate_all: Callable[..., dict[Any, Any]],
    calibrated: Sequence[int] = (),
    on_phase: Callable[[int], Any] | None = None,
    on_done: Callable[[], Any] | None = None,
) -> list[str]:
    """Re-score on the full set, until the front holds full-set values only, plus `check` random
    estimated trials; returns notes on trials whose re-score failed (they leave the front).

    `calibrated`: trials that reproduce a calibration model (a parent alone); they are marked so,
    and the fidelity report leaves them out (their estimates are in-sample).
    """
    notes: list[str] = []
    failed: set[int] = set()
    for number in calibrated:
        store.record_scores(space.study_name, number, "search", {CALIBRATED_TASK: {CALIBRATED: 1.0}})
    check = _check_sample(space, store, exclude=set(calibrated))
    for _ in range(len(store.trials(space.study_name)) + 1):  # each round re-scores at least one trial
        scores = store.scores(space.study_name, "search")
        numbers = [row.number for row in compute_front(space, store) if not is_full(space, scores.get(row.number))]
        numbers += [n for n in check if not is_full(space, scores.get(n)) and n not in numbers]
        check = []
        numbers = [n for n in numbers if n not in failed]
        if not numbers:
            break
        jobs = [(n, store.trial(space.study_name, n).genome) for n in numbers]
        if on_phase is not None:
            on_phase(len(jobs))
        for number, outcome in evaluate_all(pool, jobs, "search", on_done=on_done).items():
            if outcome.error is None:
                store.record_scores(space.study_name, number, "search", full_marked(space, outcome.result.scores))
            else:
                failed.add(number)
                store.fail_trial(space.study_name, number, f"full-set re-score failed: {outcome.error}")
                notes.append(f"trial {number}: full-set re-score failed ({outcome.error}); left out of the front")
    return notes


def _check_sample(space: SearchSpace, store: TrialReader, exclude: set[int]) -> list[int]:
    """`check` random trials that hold estimates (seeded by the search seed), for the fidelity report."""
    scores = store.scores(space.study_name, "search")
    estimated = sorted(
        record.number
        for record in store.trials(space.study_name, status="complete")
        if record.number not in exclude and not is_full(space, scores.get(record.number))
    )
    return sorted(random.Random(space.search.seed).sample(estimated, min(space.eval.estimator.check, len(estimated))))


def estimator_fidelity(space: SearchSpace, store: TrialReader) -> dict[str, dict[str, float]]:
    """Per method: Spearman and Kendall of the mean over objectives, and MAE per objective value,
    estimated vs full, over the trials re-scored on the full set, less those marked as calibration models."""
    scores = store.scores(space.study_name, "search")
    rescored = [s for s in scores.values() if _has_both(space, s) and CALIBRATED_TASK not in s]
    report = {}
    for method in METHODS:
        estimated = [[s[o.task][estimate_key(o.metric, method)] for o in space.objectives] for s in rescored]
        full = [[s[o.task][estimate_key(o.metric, FULL)] for o in space.objectives] for s in rescored]
        ranked = fidelity([_mean(v) for v in estimated], [_mean(v) for v in full])
        pairs = fidelity([x for v in estimated for x in v], [x for v in full for x in v])
        report[method] = {
            "spearman": ranked["spearman"],
            "kendall": ranked["kendall"],
            "mae": pairs["mae"],
            "n": len(rescored),
        }
    return report


def _has_both(space: SearchSpace, scores: Mapping[str, Mapping[str, float]]) -> bool:
    return all(
        estimate_key(o.metric, FULL) in scores.get(o.task, {})
        and estimate_key(o.metric, "anchor") in scores.get(o.task, {})
        for o in space.objectives
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def fidelity_line(report: Mapping[str, Mapping[str, float]], chosen: str) -> str:
    """One line for the run summary: the chosen estimator's fidelity, the others in brackets."""
    if not report or not report[chosen]["n"]:
        return "IRT estimator: no trial re-scored on the full set, no fidelity to report"
    parts = [
        f"{m} rho {r['spearman']:.2f} tau {r['kendall']:.2f} MAE {r['mae']:.3f}"
        for m, r in sorted(report.items(), key=lambda item: item[0] != chosen)
    ]
    return (
        f"IRT estimator on {report[chosen]['n']} trials re-scored on the full set: {parts[0]} ({'; '.join(parts[1:])})"
    )
