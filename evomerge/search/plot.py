"""Pictures of a search: the Pareto front against the parents, and search efficiency curves.

matplotlib is imported inside the functions (it is slow to import and only `front` and the
benchmarks need it), and drawn through the Agg canvas directly, never pyplot: no global backend
is switched, so this works headless, in threads, and inside a user's notebook alike.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TRIAL_GREY = "#a0a0a0"
_FRONT_RED = "#d62728"
_BEST_GOLD = "#ffbf00"
_BASE_BLACK = "#000000"
_REFERENCE_COLOURS = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2"]
_LABELLED_FRONT = 25  # label front points with their trial number up to this many
_DPI = 120


@dataclass(frozen=True)
class PageTable:
    """A table for the HTML page beside the plot: a heading, the column names, rows of cells.

    `row_classes` gives each row a CSS class ("reference", "best" or ""), so the page marks the
    same rows the terminal table colours.
    """

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    row_classes: Sequence[str] = ()


def plot_front(
    path_png: Path,
    *,
    objective_names: list[str],
    trials: Sequence[tuple[int, Sequence[float]]],
    front: Sequence[int],
    references: Mapping[str, Sequence[float]],
    title: str,
    best: int | None = None,
    base: str | None = None,
    tables: Sequence[PageTable] | None = None,
) -> list[Path]:
    """Draw the front (see `draw_front`); write the PNG and an HTML page beside it.

    The HTML page (same name, `.html`) embeds the PNG and shows `tables` (by default the
    front's and the references' objective values); it is self-contained (no scripts, nothing
    fetched). Returns [png, html].
    """
    path_png = Path(path_png)
    figure = draw_front(
        objective_names=objective_names,
        trials=trials,
        front=front,
        references=references,
        title=title,
        best=best,
        base=base,
    )
    _save(figure, path_png)
    names = [str(n) for n in objective_names]
    by_number = {int(number): [float(v) for v in values] for number, values in trials}
    front_numbers = sorted({int(n) for n in front})
    if tables is None:
        reference_values = {str(k): [float(v) for v in vs] for k, vs in references.items()}
        tables = _default_tables(names, by_number, front_numbers, reference_values)
    path_html = path_png.with_suffix(".html")
    path_html.write_text(_front_page(path_png, title, len(front_numbers), len(by_number), tables), encoding="utf-8")
    return [path_png, path_html]


def draw_front(
    *,
    objective_names: list[str],
    trials: Sequence[tuple[int, Sequence[float]]],
    front: Sequence[int],
    references: Mapping[str, Sequence[float]],
    title: str,
    best: int | None = None,
    base: str | None = None,
) -> Any:
    """A matplotlib Figure of every trial, the front and the reference models.

    `trials` holds (trial number, objective values); `front` holds trial NUMBERS (not positions
    in `trials`), e.g. `[trials[i][0] for i in pareto_front(...)]`. `references` maps a name
    (a parent, the base) to its objective values; `base` names the reference that is the base
    model (drawn as a hollow black square, large enough to show around parents at the same
    point). `best`: the trial number to mark as the best (a gold diamond, labelled).

    One objective: value against trial number. Two: a scatter with the front connected.
    Three or more: a scatter matrix of every pair, a histogram per objective on the diagonal.
    Front points carry their trial numbers (up to 25 of them; 10 in a scatter matrix).
    """
    names = [str(n) for n in objective_names]
    if not names:
        raise ValueError("objective_names is empty: give one name per objective")
    for number, values in trials:
        _check_width(f"trial {number}", values, len(names))
    for name, values in references.items():
        _check_width(f"reference {name!r}", values, len(names))
    by_number = {int(number): [float(v) for v in values] for number, values in trials}
    missing = [n for n in front if int(n) not in by_number]
    if missing:
        raise ValueError(
            f"front holds {missing[:5]} which are not trial numbers in `trials`; "
            "pass trial numbers, e.g. [trials[i][0] for i in pareto_front(...)]"
        )
    if best is not None and int(best) not in by_number:
        raise ValueError(f"best is trial {best}, which is not a trial number in `trials`")
    if base is not None and base not in references:
        raise ValueError(f"base {base!r} is not one of the references ({', '.join(map(str, references)) or 'none'})")
    front_numbers = sorted({int(n) for n in front})
    reference_values = {str(k): [float(v) for v in vs] for k, vs in references.items()}
    marks = _Marks(None if best is None else int(best), base)

    figure = _new_figure(len(names))
    if len(names) == 1:
        _draw_one(figure, names, by_number, front_numbers, reference_values, marks)
    elif len(names) == 2:
        _draw_two(figure, names, by_number, front_numbers, reference_values, marks)
    else:
        _draw_matrix(figure, names, by_number, front_numbers, reference_values, marks)
    figure.suptitle(title)
    return figure


def plot_search_efficiency(path_png: Path, curves: Mapping[str, Sequence[float]], *, ylabel: str, title: str) -> Path:
    """One line per sampler: a quality measure (e.g. hypervolume) after k trials, k = 1..n."""
    from matplotlib.figure import Figure

    path_png = Path(path_png)
    figure = Figure(figsize=(7, 4.5), dpi=_DPI, layout="constrained")
    axes = figure.add_subplot()
    for sampler, curve in curves.items():
        values = [float(v) for v in curve]
        axes.plot(range(1, len(values) + 1), values, label=str(sampler), linewidth=1.8)
    axes.set_xlabel("trials")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if curves:
        axes.legend()
    _save(figure, path_png)
    return path_png


# ------------------------------------------------------------------ drawing


def _new_figure(objectives: int) -> Any:
    from matplotlib.figure import Figure

    side = 7.0 if objectives <= 2 else min(2.6 * objectives, 16.0)
    size = (8.0, 4.5) if objectives == 1 else (side, side * (0.85 if objectives == 2 else 1.0))
    return Figure(figsize=size, dpi=_DPI, layout="constrained")


@dataclass(frozen=True)
class _Marks:
    best: int | None  # trial number
    base: str | None  # reference name


def _label_front(axes, points: Sequence[tuple[float, float, int]]) -> None:
    """Write each front point's trial number beside it (up to _LABELLED_FRONT points)."""
    if len(points) > _LABELLED_FRONT:
        return
    for x, y, number in points:
        axes.annotate(
            f"#{number}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small", color=_FRONT_RED
        )


def _mark_best(axes, x: float, y: float, number: int, *, label: bool = True) -> Any:
    handle = axes.scatter(
        [x],
        [y],
        marker="D",
        s=90,
        c=_BEST_GOLD,
        edgecolors="black",
        linewidths=0.9,
        zorder=6,
        label=f"best (trial {number})",
    )
    if label:  # towards the inside of the axes, where a best point (near a maximum) leaves room
        axes.annotate(
            f"best #{number}",
            (x, y),
            textcoords="offset points",
            xytext=(-8, -5),
            ha="right",
            va="top",
            fontsize="small",
            fontweight="bold",
            color="black",
        )
    return handle


def _base_label(name: str) -> str:
    return name if name.lower() == "base" else f"{name} (base)"


def _reference_style(name: str, colour: str, marks: _Marks, size: float) -> dict[str, Any]:
    """Parents: coloured stars. The base: a hollow black square drawn larger and above, so it
    shows around parents that score the same."""
    if name == marks.base:
        return dict(marker="s", s=size * 1.3, facecolors="none", edgecolors=_BASE_BLACK, linewidths=1.6, zorder=5)
    return dict(marker="*", s=size, c=colour, edgecolors="black", linewidths=0.6, zorder=4)


def _draw_one(figure, names, by_number, front_numbers, references, marks) -> None:
    axes = figure.add_subplot()
    numbers = list(by_number)
    axes.scatter(numbers, [by_number[n][0] for n in numbers], s=14, c=_TRIAL_GREY, label="trials")
    axes.scatter(
        front_numbers, [by_number[n][0] for n in front_numbers], s=40, c=_FRONT_RED, label="best value", zorder=3
    )
    _label_front(axes, [(n, by_number[n][0], n) for n in front_numbers])
    if marks.best is not None:
        _mark_best(axes, marks.best, by_number[marks.best][0], marks.best)
    for colour, (name, values) in zip(_colours(), references.items()):
        if name == marks.base:
            axes.axhline(values[0], color=_BASE_BLACK, linestyle=":", linewidth=2.0, label=_base_label(name), zorder=5)
        else:
            axes.axhline(values[0], color=colour, linestyle="--", linewidth=1.2, label=name)
    axes.set_xlabel("trial")
    axes.set_ylabel(names[0])
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _draw_two(figure, names, by_number, front_numbers, references, marks) -> None:
    axes = figure.add_subplot()
    everything = list(by_number.values())
    axes.scatter(
        [v[0] for v in everything], [v[1] for v in everything], s=14, c=_TRIAL_GREY, label=f"trials ({len(everything)})"
    )
    front_points = sorted((by_number[n][0], by_number[n][1], n) for n in front_numbers)
    axes.plot(
        [p[0] for p in front_points],
        [p[1] for p in front_points],
        "-o",
        color=_FRONT_RED,
        markersize=6,
        linewidth=1.5,
        label=f"Pareto front ({len(front_points)})",
        zorder=3,
    )
    _label_front(axes, front_points)
    if marks.best is not None:
        _mark_best(axes, *by_number[marks.best][:2], marks.best)
    for colour, (name, values) in zip(_colours(), references.items()):
        style = _reference_style(name, colour, marks, 220)
        axes.scatter([values[0]], [values[1]], label=_base_label(name) if name == marks.base else name, **style)
        axes.annotate(
            name,
            (values[0], values[1]),
            textcoords="offset points",
            xytext=(7, 6) if name == marks.base else (7, -10),
            fontsize="small",
            color=_BASE_BLACK if name == marks.base else colour,
        )
    axes.set_xlabel(names[0])
    axes.set_ylabel(names[1])
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _draw_matrix(figure, names, by_number, front_numbers, references, marks) -> None:
    k = len(names)
    grid = figure.subplots(k, k, squeeze=False)
    everything = list(by_number.values())
    on_front = [by_number[n] for n in front_numbers]
    handles = {}
    for row in range(k):
        for col in range(k):
            axes = grid[row][col]
            if row == col:
                finite = [v[col] for v in everything if math.isfinite(v[col])]
                front_finite = [v[col] for v in on_front if math.isfinite(v[col])]
                if finite:  # the front's histogram on the same bins, drawn over the rest
                    _, edges, _ = axes.hist(finite, bins=20, color=_TRIAL_GREY)
                    if front_finite:
                        axes.hist(front_finite, bins=edges, color=_FRONT_RED, alpha=0.8)
                for colour, (name, values) in zip(_colours(), references.items()):
                    if name == marks.base:
                        axes.axvline(values[col], color=_BASE_BLACK, linestyle=":", linewidth=2.0)
                    else:
                        axes.axvline(values[col], color=colour, linestyle="--", linewidth=1.2)
                if marks.best is not None:
                    axes.axvline(by_number[marks.best][col], color=_BEST_GOLD, linewidth=2.0)
            else:
                handles["trials"] = axes.scatter(
                    [v[col] for v in everything], [v[row] for v in everything], s=6, c=_TRIAL_GREY
                )
                handles["Pareto front"] = axes.scatter(
                    [v[col] for v in on_front], [v[row] for v in on_front], s=14, c=_FRONT_RED, zorder=3
                )
                _label_front(
                    axes,
                    [
                        (by_number[n][col], by_number[n][row], n)
                        for n in front_numbers
                        if n != marks.best and len(front_numbers) <= 10
                    ],
                )
                for colour, (name, values) in zip(_colours(), references.items()):
                    label = _base_label(name) if name == marks.base else name
                    handles[label] = axes.scatter(
                        [values[col]], [values[row]], **_reference_style(name, colour, marks, 120)
                    )
                if marks.best is not None:
                    best = by_number[marks.best]
                    handles[f"best (trial {marks.best})"] = _mark_best(
                        axes, best[col], best[row], marks.best, label=row == 0 and col == 1
                    )
            axes.tick_params(labelsize="x-small")
            if row == k - 1:
                axes.set_xlabel(names[col], fontsize="small")
            if col == 0:
                axes.set_ylabel(names[row], fontsize="small")
    figure.legend(
        list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 5), fontsize="small"
    )


def _colours():
    while True:
        yield from _REFERENCE_COLOURS


def _save(figure: Any, path_png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path_png, format="png")


def _check_width(what: str, values: Sequence[float], width: int) -> None:
    if len(values) != width:
        raise ValueError(f"{what} has {len(values)} values for {width} objectives")


# --------------------------------------------------------------------- html

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
td.best, tr.best td { background: #fff3c4; font-weight: bold; }
tr.reference td { color: #1f5f8b; }
"""


def _default_tables(names, by_number, front_numbers, references) -> list[PageTable]:
    tables = [PageTable("Pareto front", ["trial", *names], [[str(n), *_cells(by_number[n])] for n in front_numbers])]
    if references:
        tables.append(
            PageTable("References", ["model", *names], [[name, *_cells(values)] for name, values in references.items()])
        )
    return tables


def _front_page(path_png, title, front_size, trial_count, tables: Sequence[PageTable]) -> str:
    image = base64.b64encode(Path(path_png).read_bytes()).decode("ascii")
    text = html.escape(title)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{text}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{text}</h1>",
        f'<img alt="{text}" src="data:image/png;base64,{image}">',
        f"<p>Pareto front: {front_size} of {trial_count} trials.</p>",
    ]
    for index, table in enumerate(tables):
        kind = "front" if index == 0 else ("references" if table.title == "References" else f"table{index}")
        header = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
        classes = list(table.row_classes) + [""] * (len(table.rows) - len(table.row_classes))
        rows = "".join(
            (f'<tr class="{html.escape(css)}">' if css else "<tr>")
            + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row)
            + "</tr>\n"
            for row, css in zip(table.rows, classes)
        )
        parts += [
            f"<h2>{html.escape(table.title)}</h2>",
            f'<table class="{kind}"><thead><tr>{header}</tr></thead>',
            f"<tbody>\n{rows}</tbody></table>",
        ]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _cells(values: Sequence[float]) -> list[str]:
    return [f"{v:.6g}" for v in values]
