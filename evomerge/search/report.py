"""Tables of a study for the terminal: the Pareto front with the parents as reference rows."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from evomerge.search.catalog import fmt
from evomerge.search.front import FrontRow

HASH_CHARS = 12  # of the weights hash, in every table (enough to tell trials apart)


def has_selection(rows: Sequence[FrontRow]) -> bool:
    """Whether any row was re-scored on held-out tasks (the tables then get that column)."""
    return any(r.selection for r in rows)


def front_columns(objective_names: Sequence[str], held_out: bool) -> list[str]:
    """The columns of every front table (terminal, HTML page, dashboard note), in order."""
    return ["model", *objective_names, "mean", *(["held-out mean"] if held_out else []), "weights"]


def front_cells(row: FrontRow, held_out: bool, *, best: FrontRow | None = None) -> list[str]:
    """One row's cells under `front_columns`: the best is labelled "(best)"."""
    label = row.label + (" (best)" if best is not None and row is best else "")
    cells = [label, *[fmt(v) for v in row.search], fmt(row.mean("search"))]
    if held_out:
        cells.append(fmt(row.mean("selection")) if row.selection else "-")
    cells.append((row.weights_hash or "")[:HASH_CHARS])
    return cells


def front_table(
    objective_names: Sequence[str],
    front: Sequence[FrontRow],
    references: Sequence[FrontRow],
    *,
    best: FrontRow | None = None,
    title: str = "Pareto front",
) -> Table:
    held_out = has_selection([*front, *references])
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    for name in objective_names:
        table.add_column(name, justify="right")
    for name in front_columns(objective_names, held_out)[1 + len(objective_names) : -1]:  # the means
        table.add_column(name, justify="right", style="bold")
    table.add_column("weights", justify="left", style="dim")

    def add(row: FrontRow, style: str | None = None) -> None:
        table.add_row(*front_cells(row, held_out, best=best), style=style)

    for row in references:
        add(row, style="cyan")
    if references and front:
        table.add_section()
    for row in front:
        add(row, style="green" if best is not None and row is best else None)
    return table


def parents_beaten(front: Sequence[FrontRow], references: Sequence[FrontRow], parents: Sequence[str]) -> list[FrontRow]:
    """Front members whose mean over objectives beats every parent's."""
    parent_rows = [r for r in references if r.label in parents]
    if not parent_rows:
        return []
    bar = max(r.mean("search") for r in parent_rows)
    return [r for r in front if r.mean("search") > bar]
