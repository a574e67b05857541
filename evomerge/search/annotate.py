"""What optuna-dashboard shows of an evomerge search: trial user attributes and notes.

The dashboard shows optuna's values and params, a trial's user attributes and notes (markdown,
on the trial and on the study). evomerge's own results (each objective's score under its name,
the mean the tables show, the method of each layer group, the weights hash, timings) live in its
trial store; this module turns them into those attributes and notes so they are seen where the
study is watched.

Two things are known only after a trial has finished: its held-out scores (finalists are
re-scored at the end) and which trial is best. optuna freezes a finished trial's user
attributes, so those go to notes: a section in each finalist's note and the study note (with the
front and the parents' scores as a table). A note section written by evomerge is rewritten by
each run; whatever a user wrote around it in the dashboard is kept.

The functions that build text and attributes are pure; `write_note`, `set_study_attrs` and
`set_trial_attrs` write them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from evomerge.search.report import HASH_CHARS, front_cells, front_columns, has_selection

if TYPE_CHECKING:
    from evomerge.genome.protocol import Genome

SECTION_START = "## evomerge"  # a note's evomerge section starts with a heading that begins so ...
SECTION_END = "_written by evomerge"  # ... and ends with the line that begins so
_END_LINE = f"{SECTION_END}; each run rewrites this part of the note, text outside it is kept._"
NOTE_ROWS = 20  # front rows in the study note
_DIGITS = 6


def _number(value: float) -> float | None:
    """A score as stored in a user attribute: rounded for reading; None for NaN (JSON has no NaN)."""
    value = float(value)
    return None if math.isnan(value) else round(value, _DIGITS)


def mean(values: Sequence[float]) -> float:
    """The mean over objectives, as the front tables show it."""
    return sum(values) / len(values) if values else math.nan


def methods_line(genome: Genome, params: Mapping[str, Any]) -> str:
    """The merge methods of a trial in one line (the genome says how)."""
    return genome.describe(params)


def role(user_attrs: Mapping[str, Any]) -> str | None:
    """What an enqueued trial stands for: a parent alone, the uniform mix, a retry (None: sampled)."""
    seed = user_attrs.get("seed")
    retry = user_attrs.get("retry_of")
    text = None
    if isinstance(seed, str) and seed.startswith("parent:"):
        text = f"parent {seed.split(':', 1)[1]} alone"
    elif seed == "uniform":
        text = "uniform mix of the parents"
    if retry is not None:
        text = f"{text}, " if text else ""
        text += f"retry of trial {retry}"
    return text


def search_attrs(
    objective_names: Sequence[str],
    values: Sequence[float],
    *,
    methods: str,
    weights_hash: str | None,
    seconds: Mapping[str, float],
    role_text: str | None = None,
    rung: str | None = None,
) -> dict[str, Any]:
    """The user attributes of a finished trial: scores by objective name, mean, recipe, hash, timings.

    `seconds` maps a phase (merge, hash, eval, trial) to its duration. `rung` (successive
    halving): the item budget the scores are on, e.g. "rung 0/2 (25 items per task), stopped".
    """
    attrs: dict[str, Any] = {f"score: {name}": _number(v) for name, v in zip(objective_names, values)}
    attrs["mean"] = _number(mean(values))
    attrs["methods"] = methods
    if weights_hash:
        attrs["weights hash"] = weights_hash
    attrs["seconds"] = " · ".join(f"{name} {value:.2f}" for name, value in seconds.items() if value is not None)
    if role_text:
        attrs["role"] = role_text
    if rung:
        attrs["rung"] = rung
    return attrs


def _row_summary(row, names: Sequence[str]) -> str:
    """One front row in a line: mean, held-out mean, each objective, hash."""
    parts = [f"mean {row.mean():.3f}"]
    if row.selection:
        parts.append(f"held-out mean {mean(row.selection):.3f}")
    parts += [f"{name} {value:.3f}" for name, value in zip(names, row.search)]
    if row.weights_hash:
        parts.append(f"weights {row.weights_hash[:HASH_CHARS]}")
    return " · ".join(parts)


def study_attrs(
    objective_names: Sequence[str],
    references: Sequence[Any],
    best: Any | None,
    seeds: Mapping[int, str],
    *,
    finished: bool,
    methods: str | None = None,
) -> dict[str, Any]:
    """The study's user attributes (shown on the dashboard's study page): the best trial, the
    objectives in the order of a trial's values, the enqueued trials and each parent as it is.

    In this order: the dashboard lists a study's attributes in the order they were first written
    and shows the first five, so the best is written first (a placeholder until the search ends).
    """
    if best is not None:
        summary = f"trial {best.number} · {_row_summary(best, objective_names)}" + (f" · {methods}" if methods else "")
    else:
        summary = "no trial has completed with every objective scored" if finished else "chosen when the search ends"
    attrs: dict[str, Any] = {
        "evomerge: best": summary,
        "evomerge: objectives": "values are, in order: " + ", ".join(objective_names),
    }
    if seeds:
        attrs["evomerge: enqueued trials"] = "; ".join(f"trial {n}: {text}" for n, text in sorted(seeds.items()))
    for row in references:
        attrs[f"evomerge: reference {row.label}"] = _row_summary(row, objective_names)
    return attrs


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def escape(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    lines = [
        "| " + " | ".join(escape(h) for h in header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|",
    ]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return lines


def study_note(
    study_name: str,
    objectives: Sequence[Any],
    front: Sequence[Any],
    references: Sequence[Any],
    *,
    best: Any | None,
    seeds: Mapping[int, str],
    n_complete: int,
    n_failed: int,
    finalists: int,
    finished: bool,
    rungs: Sequence[str] = (),
) -> str:
    """The study note's evomerge section: the best trial, the front and the parents, as the tables show them.

    `rungs`: successive halving's lines (`evomerge.search.fidelity.rung_summary`), shown under the counts.

    `objectives` are the space's objectives; `front`/`references`/`best` FrontRows; `seeds` maps
    the number of each enqueued trial to its role (a parent alone, the uniform mix).
    """
    names = [o.label for o in objectives]
    held_out = has_selection([*front, *references])
    lines = [f"{SECTION_START}: study {study_name}", ""]
    if best is not None:
        how = (
            f"the highest weighted score on the held-out tasks among the front's best {finalists} members"
            if best.selection
            else "the highest weighted search score (no held-out tasks were scored)"
        )
        held = f", held-out mean {mean(best.selection):.3f}" if best.selection else ""
        lines.append(f"**Best: trial {best.number}** (mean {best.mean():.3f}{held}), chosen by {how}.")
    elif finished:
        lines.append("**No best trial**: no trial has completed with every objective scored.")
    else:
        lines.append("**Search running**: the best trial is chosen when it ends. The parents, scored as they are:")
    lines += ["", f"{n_complete} trials complete, {n_failed} failed.", ""]
    if rungs:
        lines += [*rungs, ""]
    rows = [front_cells(r, held_out, best=best) for r in references]
    rows = [[f"{cells[0]} (as it is)", *cells[1:]] for cells in rows]
    shown = list(front[:NOTE_ROWS])
    if best is not None and best not in shown:
        shown.append(best)
    rows += [
        [f"**{c}**" if best is not None and r is best else c for c in front_cells(r, held_out, best=best)]
        for r in shown
    ]
    lines += _markdown_table(front_columns(names, held_out), rows)
    if len(front) > len(shown):
        lines.append(f"\n{len(front) - len(shown)} more front members: `evomerge front`.")
    if seeds:
        lines += ["", "Enqueued trials: " + "; ".join(f"trial {n}: {text}" for n, text in sorted(seeds.items())) + "."]
    lines += [
        "",
        "Objectives: "
        + "; ".join(
            f"{o.label} = {o.task} `{o.metric}` ({o.direction}, weight {o.weight:g}"
            + (f", held-out {o.selection_task})" if o.selection_task else ")")
            for o in objectives
        )
        + ".",
        "",
        _END_LINE,
    ]
    return "\n".join(lines)


def finalist_note(
    objective_names: Sequence[str], selection: Sequence[float] | None, *, is_best: bool, error: str | None = None
) -> str:
    """A finalist's note section: its held-out scores by objective name, and whether it is the best."""
    lines = [f"{SECTION_START}: held-out scores", ""]
    if is_best:
        lines += ["**Best trial of the study** (highest held-out weighted score among the finalists).", ""]
    if error:
        lines.append(f"Held-out scoring failed: {error}")
    elif selection:
        rows = [[name, f"{value:.3f}"] for name, value in zip(objective_names, selection)]
        rows.append(["**mean**", f"**{mean(selection):.3f}**"])
        lines += _markdown_table(["objective", "held-out score"], rows)
    lines += ["", _END_LINE]
    return "\n".join(lines)


def replace_section(note: str, section: str) -> str:
    """`note` with its evomerge section replaced by `section` (appended when it has none)."""
    lines = note.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(SECTION_START)), None)
    if start is None:
        return f"{note.rstrip()}\n\n{section}" if note.strip() else section
    end = next((i for i in range(start, len(lines)) if lines[i].startswith(SECTION_END)), len(lines) - 1)
    return "\n".join([*lines[:start], *section.splitlines(), *lines[end + 1 :]])


def write_note(study, trial_id: int | None, section: str) -> None:
    """Put `section` into the note of the study (trial_id None) or of one of its trials.

    Notes are optuna-dashboard's (kept in the study's system attributes, which stay writable after
    a trial finished); a user's own text in the note is kept.
    """
    from optuna_dashboard._note import get_note_from_system_attrs, save_note_with_version

    storage, study_id = study._storage, study._study_id
    current = get_note_from_system_attrs(storage.get_study_system_attrs(study_id), trial_id)
    body = replace_section(current["body"], section)
    if body != current["body"]:
        save_note_with_version(storage, study_id, trial_id, current["version"] + 1, body)


def set_study_attrs(study, attrs: Mapping[str, Any]) -> None:
    """Set the study's user attributes (a study's stay writable)."""
    for key, value in attrs.items():
        study.set_user_attr(key, value)


def set_trial_attrs(trial, attrs: Mapping[str, Any]) -> None:
    """Set a running trial's user attributes (before optuna is told: finished trials are frozen).

    In one transaction where the storage can (evomerge's BatchingRDBStorage): optuna commits each
    attribute on its own, and a trial has about ten.
    """
    storage = getattr(trial, "storage", None)
    backend = getattr(storage, "_backend", storage)  # optuna wraps an RDBStorage in a cache that passes writes on
    write_all = getattr(backend, "set_trial_user_attrs", None)
    if write_all is not None:
        write_all(trial._trial_id, dict(attrs))
        return
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
