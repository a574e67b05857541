"""A heatmap per layer group of the pairwise cosine of task vectors (matplotlib's Agg canvas, no pyplot)."""

from __future__ import annotations

import math
from pathlib import Path

from evomerge.inspect.analysis import GroupStats, Inspection

_DPI = 120


def plot_cosine(inspection: Inspection, path: Path) -> Path:
    """One panel per layer group and one for all tensors; cells coloured from -1 (red) to +1 (blue)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [GroupStats("all tensors", inspection.overall), *inspection.layer_groups]
    k = len(inspection.models)
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    side = 1.2 + 0.45 * k
    figure = Figure(figsize=(columns * side + 1.0, rows * side + 0.6), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    image = None
    for index, axis in enumerate(axes.flat):
        if index >= len(panels):
            axis.set_axis_off()
            continue
        panel = panels[index]
        image = axis.imshow(panel.stats.cosine, vmin=-1, vmax=1, cmap="RdBu")
        count = panel.stats.tensors
        axis.set_title(f"{panel.name} ({count} tensor{'s' if count != 1 else ''})", fontsize=9)
        axis.set_xticks(range(k), inspection.models, rotation=45, ha="right", fontsize=8)
        axis.set_yticks(range(k), inspection.models if index % columns == 0 else [""] * k, fontsize=8)
        for i in range(k):
            for j in range(k):
                value = panel.stats.cosine[i][j]
                if not math.isnan(value):
                    colour = "white" if abs(value) > 0.6 else "black"
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="cosine of task vectors")
    figure.suptitle(f"Cosine of the task vectors (each model - {inspection.base})", fontsize=10)
    path = Path(path)
    figure.savefig(path, format="png")
    return path
