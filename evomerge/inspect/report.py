"""An inspection for people (rich tables, the reading, a genome snippet) and for programs (JSON)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from evomerge.config.mergekit_yaml import dump_yaml
from evomerge.inspect.advice import HIGH_COSINE, NEAR_ZERO, OPPOSED, Advice
from evomerge.inspect.analysis import Inspection


def _number(value: float, spec: str = ".2f") -> str:
    return "-" if math.isnan(value) else format(value, spec)


def _cosine(value: float) -> str:
    if math.isnan(value):
        return "-"
    style = (
        "green" if value >= HIGH_COSINE else "red" if value < OPPOSED else "yellow" if abs(value) < NEAR_ZERO else ""
    )
    text = f"{value:+.2f}"
    return f"[{style}]{text}[/]" if style else text


def _pairs(inspection: Inspection) -> list[tuple[int, int]]:
    k = len(inspection.models)
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def _pair_name(inspection: Inspection, i: int, j: int) -> str:
    return f"{inspection.models[i]}/{inspection.models[j]}"


def summary_line(inspection: Inspection) -> str:
    stats = inspection.overall
    read = (
        "every entry"
        if stats.entries_read == stats.entries
        else f"{stats.entries_read:,} entries read ({stats.entries_read / stats.entries:.2%})"
    )
    return (
        f"base {inspection.base}; {len(inspection.models)} models: {', '.join(inspection.models)}; "
        f"{stats.tensors} tensors, {stats.entries:,} entries per model, {read}; {inspection.seconds:.2f} s"
    )


def task_vector_table(inspection: Inspection) -> Table:
    stats = inspection.overall
    table = Table(
        title="Task vectors (model - base)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    table.add_column("model")
    table.add_column("norm / base", justify="right")
    for density in stats.densities:
        table.add_column(f"top {density:.0%}\nenergy", justify="right")
    for index, name in enumerate(inspection.models):
        table.add_row(
            name,
            _number(stats.relative_norm[index], ".2%"),
            *(_number(row[index], ".0%") for row in stats.kept_energy),
        )
    return table


def pair_table(inspection: Inspection) -> Table:
    stats = inspection.overall
    table = Table(
        title="Pairs, all tensors", title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False
    )
    table.add_column("pair", no_wrap=True)
    table.add_column("cosine", justify="right")
    table.add_column("sign\nconflict", justify="right")
    for density in stats.densities:
        table.add_column(f"top {density:.0%}\noverlap", justify="right")
    table.add_column(f"top {stats.densities[0]:.0%}\nconflict", justify="right")
    for i, j in _pairs(inspection):
        table.add_row(
            _pair_name(inspection, i, j),
            _cosine(stats.cosine[i][j]),
            _number(stats.sign_conflict[i][j], ".0%"),
            *(_number(matrix[i][j], ".0%") for matrix in stats.trim_overlap),
            _number(stats.trim_overlap_conflict[0][i][j], ".0%"),
        )
    table.caption = (
        "sign conflict: of the entries both change, the share with opposite signs (unrelated signs: 50%); "
        "top d: of the entries each keeps when trimmed to density d (as TIES), the share they have in common "
        "(by chance: d); conflict: opposite signs among those"
    )
    table.caption_justify = "left"
    return table


def cosine_table(inspection: Inspection, title: str, groups) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    table.add_column("pair", no_wrap=True)
    for group in groups:
        table.add_column(group.name.removeprefix("attn."), justify="right")
    for i, j in _pairs(inspection):
        table.add_row(_pair_name(inspection, i, j), *(_cosine(g.stats.cosine[i][j]) for g in groups))
    return table


def genome_yaml(advice: Advice) -> str:
    return dump_yaml({"genome": advice.genome})


def print_report(inspection: Inspection, advice: Advice, console: Console) -> None:
    console.print(summary_line(inspection))
    console.print(f"read: {inspection.sampling.describe()}")
    if inspection.skipped:
        console.print(f"left out (not floating point): {', '.join(inspection.skipped)}")
    console.print(task_vector_table(inspection))
    if len(inspection.models) >= 2:
        console.print(pair_table(inspection))
        console.print(
            cosine_table(
                inspection, f"Cosine by layer group ({inspection.group_size} per group)", inspection.layer_groups
            )
        )
        console.print(
            cosine_table(inspection, "Cosine by tensor kind (q, k, v, o, qkv: attention projections)", inspection.kinds)
        )
    console.print("[bold]Reading[/]")
    for sentence in advice.reading:
        console.print(f"- {sentence}")
    console.print("[bold]A starting genome[/] (paste into a space file's genome:)")
    console.print(genome_yaml(advice).rstrip(), markup=False, highlight=False)


def _finite(value):
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def write_json(inspection: Inspection, advice: Advice, path: Path) -> None:
    """Everything in the tables and more (sign conflicts and overlaps per group); NaN as null."""
    data = {"inspection": dataclasses.asdict(inspection), "advice": dataclasses.asdict(advice)}
    Path(path).write_text(json.dumps(_finite(data), indent=1) + "\n")
