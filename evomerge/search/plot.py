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
from pathlib import Path
from typing import Any

_TRIAL_GREY = "#a0a0a0"
_FRONT_RED = "#d62728"
_REFERENCE_COLOURS = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2"]
_LABELLED_FRONT = 25  # label front points with their trial number up to this many
_DPI = 120


def plot_front(
    path_png: Path,
    *,
    objective_names: list[str],
    trials: Sequence[tuple[int, Sequence[float]]],
    front: Sequence[int],
    references: Mapping[str, Sequence[float]],
    title: str,
) -> list[Path]:
    """Draw every trial, the front and the reference models; write the PNG and an HTML page.

    `trials` holds (trial number, objective values); `front` holds trial NUMBERS (not positions
    in `trials`), e.g. `[trials[i][0] for i in pareto_front(...)]`. `references` maps a name
    (a parent, the base) to its objective values.

    One objective: value against trial number. Two: a scatter with the front connected.
    Three or more: a scatter matrix of every pair, a histogram per objective on the diagonal.
    The HTML page beside the PNG (same name, `.html`) embeds it and tabulates the front; it is
    self-contained (no scripts, nothing fetched). Returns [png, html].
    """
    path_png = Path(path_png)
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
    front_numbers = sorted({int(n) for n in front})
    reference_values = {str(k): [float(v) for v in vs] for k, vs in references.items()}

    figure = _new_figure(len(names))
    if len(names) == 1:
        _draw_one(figure, names, by_number, front_numbers, reference_values)
    elif len(names) == 2:
        _draw_two(figure, names, by_number, front_numbers, reference_values)
    else:
        _draw_matrix(figure, names, by_number, front_numbers, reference_values)
    figure.suptitle(title)
    _save(figure, path_png)

    path_html = path_png.with_suffix(".html")
    path_html.write_text(
        _front_page(path_png, title, names, by_number, front_numbers, reference_values),
        encoding="utf-8",
    )
    return [path_png, path_html]


def plot_search_efficiency(
    path_png: Path, curves: Mapping[str, Sequence[float]], *, ylabel: str, title: str
) -> Path:
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


def _draw_one(figure, names, by_number, front_numbers, references) -> None:
    axes = figure.add_subplot()
    numbers = list(by_number)
    axes.scatter(numbers, [by_number[n][0] for n in numbers], s=14, c=_TRIAL_GREY, label="trials")
    axes.scatter(front_numbers, [by_number[n][0] for n in front_numbers], s=40, c=_FRONT_RED,
                 label="best", zorder=3)
    for colour, (name, values) in zip(_colours(), references.items()):
        axes.axhline(values[0], color=colour, linestyle="--", linewidth=1.2, label=name)
    axes.set_xlabel("trial")
    axes.set_ylabel(names[0])
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _draw_two(figure, names, by_number, front_numbers, references) -> None:
    axes = figure.add_subplot()
    everything = list(by_number.values())
    axes.scatter([v[0] for v in everything], [v[1] for v in everything], s=14, c=_TRIAL_GREY,
                 label=f"trials ({len(everything)})")
    front_points = sorted((by_number[n][0], by_number[n][1], n) for n in front_numbers)
    axes.plot([p[0] for p in front_points], [p[1] for p in front_points], "-o", color=_FRONT_RED,
              markersize=6, linewidth=1.5, label=f"Pareto front ({len(front_points)})", zorder=3)
    if len(front_points) <= _LABELLED_FRONT:
        for x, y, number in front_points:
            axes.annotate(f"#{number}", (x, y), textcoords="offset points", xytext=(4, 4),
                          fontsize="x-small", color=_FRONT_RED)
    for colour, (name, values) in zip(_colours(), references.items()):
        axes.scatter([values[0]], [values[1]], marker="*", s=220, c=colour, edgecolors="black",
                     linewidths=0.6, zorder=4, label=name)
        axes.annotate(name, (values[0], values[1]), textcoords="offset points", xytext=(7, -10),
                      fontsize="small", color=colour)
    axes.set_xlabel(names[0])
    axes.set_ylabel(names[1])
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _draw_matrix(figure, names, by_number, front_numbers, references) -> None:
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
                for colour, values in zip(_colours(), references.values()):
                    axes.axvline(values[col], color=colour, linestyle="--", linewidth=1.2)
            else:
                handles["trials"] = axes.scatter([v[col] for v in everything],
                                                 [v[row] for v in everything], s=6, c=_TRIAL_GREY)
                handles["Pareto front"] = axes.scatter([v[col] for v in on_front],
                                                       [v[row] for v in on_front], s=14,
                                                       c=_FRONT_RED, zorder=3)
                for colour, (name, values) in zip(_colours(), references.items()):
                    handles[name] = axes.scatter([values[col]], [values[row]], marker="*", s=120,
                                                 c=colour, edgecolors="black", linewidths=0.5,
                                                 zorder=4)
            axes.tick_params(labelsize="x-small")
            if row == k - 1:
                axes.set_xlabel(names[col], fontsize="small")
            if col == 0:
                axes.set_ylabel(names[row], fontsize="small")
    figure.legend(list(handles.values()), list(handles), loc="outside lower center",
                  ncols=min(len(handles), 5), fontsize="small")


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
"""


def _front_page(path_png, title, names, by_number, front_numbers, references) -> str:
    image = base64.b64encode(Path(path_png).read_bytes()).decode("ascii")
    header = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    front_rows = "".join(
        f"<tr><td>{number}</td>{_cells(by_number[number])}</tr>\n" for number in front_numbers
    )
    reference_rows = "".join(
        f"<tr><td>{html.escape(name)}</td>{_cells(values)}</tr>\n"
        for name, values in references.items()
    )
    text = html.escape(title)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{text}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{text}</h1>",
        f'<img alt="{text}" src="data:image/png;base64,{image}">',
        f"<h2>Pareto front: {len(front_numbers)} of {len(by_number)} trials</h2>",
        f'<table class="front"><thead><tr><th>trial</th>{header}</tr></thead>',
        f"<tbody>\n{front_rows}</tbody></table>",
    ]
    if references:
        parts += [
            "<h2>References</h2>",
            f'<table class="references"><thead><tr><th>model</th>{header}</tr></thead>',
            f"<tbody>\n{reference_rows}</tbody></table>",
        ]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _cells(values: Sequence[float]) -> str:
    return "".join(f"<td>{v:.6g}</td>" for v in values)
