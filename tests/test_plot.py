"""`front --plot`'s picture: the best trial marked, the base visible, trial numbers on the front."""

from __future__ import annotations

import re

import pytest

from evomerge.search.plot import PageTable, draw_front, plot_front

TRIALS = [
    (0, [0.0, 1.0, 0.0]),
    (1, [1.0, 0.0, 0.0]),
    (2, [0.9, 0.8, 0.7]),
    (3, [0.5, 0.5, 0.5]),
    (4, [0.95, 0.9, 0.6]),
    (5, [0.2, 0.1, 0.1]),
]
FRONT = [0, 1, 2, 4]
REFERENCES = {"base": [0.0, 0.0, 0.0], "close": [1.0, 0.0, 0.0], "sort": [0.0, 1.0, 0.0]}


def texts(figure) -> list[str]:
    return [t.get_text() for axes in figure.axes for t in axes.texts]


def legend_labels(figure) -> list[str]:
    legends = [*figure.legends, *(a.get_legend() for a in figure.axes if a.get_legend())]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


@pytest.mark.parametrize("objectives", [1, 2, 3])
def test_the_best_the_base_and_the_front_numbers_are_drawn(objectives):
    trials = [(n, v[:objectives]) for n, v in TRIALS]
    references = {k: v[:objectives] for k, v in REFERENCES.items()}
    front = FRONT if objectives > 1 else [4]
    figure = draw_front(
        objective_names=["x", "y", "z"][:objectives],
        trials=trials,
        front=front,
        references=references,
        title="t",
        best=4,
        base="base",
    )
    labels = legend_labels(figure)
    assert "best (trial 4)" in labels and "base" in labels and {"close", "sort"} <= set(labels)
    written = texts(figure)
    assert "best #4" in written
    numbers = {int(m[1]) for text in written if (m := re.fullmatch(r"#(\d+)", text))}
    assert numbers == set(front) - ({4} if objectives == 3 else set())  # the best carries its own label
    if objectives > 1:  # the base: a hollow square over the parents' stars, so it shows where they coincide
        hollow = [
            c
            for axes in figure.axes
            for c in axes.collections
            if len(c.get_offsets()) == 1 and c.get_facecolor().size == 0
        ]
        assert len(hollow) == objectives * (objectives - 1) or (objectives == 2 and len(hollow) == 1)
        assert all(list(c.get_offsets()[0]) == [0.0, 0.0] for c in hollow)
    else:  # one objective: the base is a dotted black line at its score
        dotted = [line for line in figure.axes[0].lines if line.get_linestyle() == ":"]
        assert len(dotted) == 1 and dotted[0].get_label() == "base"


def test_a_base_named_otherwise_is_labelled_as_the_base():
    figure = draw_front(
        objective_names=["x", "y"],
        trials=[(n, v[:2]) for n, v in TRIALS],
        front=FRONT,
        references={"llama": [0.0, 0.0], "close": [1.0, 0.0]},
        title="t",
        base="llama",
    )
    assert "llama (base)" in legend_labels(figure)


def test_marks_must_name_what_is_drawn():
    trials = [(n, v[:2]) for n, v in TRIALS]
    with pytest.raises(ValueError, match="best is trial 99"):
        draw_front(objective_names=["x", "y"], trials=trials, front=FRONT, references={}, title="t", best=99)
    with pytest.raises(ValueError, match="base 'base' is not one of the references"):
        draw_front(
            objective_names=["x", "y"], trials=trials, front=FRONT, references={"a": [0, 0]}, title="t", base="base"
        )


def test_the_page_shows_the_given_tables_with_their_marks(tmp_path):
    table = PageTable(
        "Pareto front of demo",
        ["model", "x", "y", "mean", "held-out mean", "weights"],
        [
            ["base", "0.000", "0.000", "0.000", "-", ""],
            ["trial 4 (best)", "0.950", "0.900", "0.925", "0.930", "0123456789ab"],
        ],
        ["reference", "best"],
    )
    png, page = plot_front(
        tmp_path / "f.png",
        objective_names=["x", "y"],
        trials=[(n, v[:2]) for n, v in TRIALS],
        front=FRONT,
        references={"base": [0.0, 0.0]},
        title="demo <front>",
        best=4,
        base="base",
        tables=[table],
    )
    text = page.read_text(encoding="utf-8")
    assert "<th>held-out mean</th><th>weights</th>" in text and "demo &lt;front&gt;" in text
    assert (
        '<tr class="best"><td>trial 4 (best)</td><td>0.950</td><td>0.900</td><td>0.925</td><td>0.930</td>'
        "<td>0123456789ab</td></tr>" in text
    )
    assert '<tr class="reference"><td>base</td>' in text
    assert "<script" not in text and "http" not in text


def test_front_refuses_a_plot_path_it_cannot_write_before_any_work(tmp_path):
    """The real console script: one line naming --plot or --top, exit 2, no traceback, nothing written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = Path(sys.executable).with_name("evomerge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "evomerge.cli"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    (tmp_path / "folder.png").mkdir()
    cases = [
        (["--plot", str(tmp_path)], "is a folder; give a file name"),
        (["--plot", str(tmp_path / "front.svg")], "expected a .png file name"),
        (["--plot", str(tmp_path / "folder.png")], "is a folder"),
        (["--plot", str(a_file / "front.png")], "is a file, not a folder"),
    ]
    for options, message in cases:
        done = subprocess.run(
            [*command, "front", str(tmp_path / "space.yml"), *options],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    # a negative --top is a usage error: click's usage line, then one error line naming the option
    done = subprocess.run(
        [*command, "front", str(tmp_path / "space.yml"), "--top", "-2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "--top" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png", "notes.txt"] and a_file.read_text() == "mine"
