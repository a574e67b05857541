"""Tables of a study for the terminal: the Pareto front with the parents as reference rows."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from evomerge.search.catalog import fmt
from evomerge.search.runner import FrontRow


def front_table(
    objective_names: Sequence[str],
    front: Sequence[FrontRow],
    references: Sequence[FrontRow],
    *,
    best: FrontRow | None = None,
    title: str = "Pareto front",
) -> Table:
    has_selection = any(r.selection for r in [*front, *references])
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    for name in objective_names:
        table.add_column(name, justify="right")
    table.add_column("mean", justify="right", style="bold")
    if has_selection:
        table.add_column("held-out mean", justify="right", style="bold")
    table.add_column("weights", justify="left", style="dim")

    def add(row: FrontRow, style: str | None = None) -> None:
        label = row.label + (" (best)" if best is not None and row is best else "")
        cells = [label, *[fmt(v) for v in row.search], fmt(row.mean("search"))]
        if has_selection:
            cells.append(fmt(row.mean("selection")) if row.selection else "-")
        cells.append((row.weights_hash or "")[:12])
        table.add_row(*cells, style=style)

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
