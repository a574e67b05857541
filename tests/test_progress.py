"""Search progress: every phase is shown, plain lines every N trials when stderr is not a terminal."""

from __future__ import annotations

import io

import pytest

from evomerge.progress import SearchProgress, plain_line_interval


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_plain_lines_follow_every_phase_and_every_n_trials():
    out = io.StringIO()
    bar = SearchProgress(9, stream=out, terminal=False, every=3)
    bar.start_phase("loading", detail="5 models")
    bar.advance()
    bar.start_phase("parents", 2)
    bar.advance()
    bar.advance()
    bar.start_phase("search", 9, done=1)  # a resumed study: one trial finished before
    for number in range(2, 10):
        bar.update(in_flight=2)
        if number == 4:
            bar.update(best=(4, 0.8125), front=3)
        bar.update(in_flight=1, failed=1 if number >= 6 else 0)
        bar.advance()
    bar.start_phase("selection", 3)
    for _ in range(3):
        bar.advance()
    bar.close()
    lines = lines_of(out)
    assert lines[:4] == [
        "evomerge: loading sources, model and tasks (5 models)",
        "evomerge: scoring the parents as they are: 0/2",
        "evomerge: scoring the parents as they are: 2/2 done",
        "evomerge: search: 1/9",
    ]
    search = [line for line in lines if line.startswith("evomerge: search: ") and "trials" in line]
    assert [line.split(" trials")[0] for line in search] == [
        "evomerge: search: 4/9",
        "evomerge: search: 7/9",
        "evomerge: search: 9/9",
    ]
    assert search[0].startswith("evomerge: search: 4/9 trials, in flight 1, best 0.812 (trial 4), front 3, failed 0, ")
    assert "failed 1" in search[1] and "eta" in search[1] and "eta" not in search[2]
    assert lines[-2:] == [
        "evomerge: held-out scores of the parents and finalists: 0/3",
        "evomerge: held-out scores of the parents and finalists: 3/3 done",
    ]


def test_disabled_progress_is_silent_and_unknown_phases_are_refused():
    out = io.StringIO()
    bar = SearchProgress(4, enabled=False, stream=out, terminal=False)
    bar.start_phase("search", 4)
    bar.update(best=(0, 1.0), in_flight=1)
    bar.advance()
    bar.close()
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="unknown phase 'warmup'"):
        bar.start_phase("warmup")


def test_a_terminal_gets_one_bar_per_phase(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = io.StringIO()
    bar = SearchProgress(4, stream=out, terminal=True)
    bar.start_phase("parents", 1)
    bar.advance()
    bar.start_phase("search", 4)
    bar.update(in_flight=1, best=(2, 0.5), front=2)
    bar.advance(4)
    bar.close()
    text = out.getvalue()
    assert "scoring the parents as they are" in text and "1/1" in text
    assert "in flight 1  best 0.500 (trial 2)  front 2  failed 0" in text and "4/4" in text
    assert "evomerge:" not in text  # no plain lines at a terminal


@pytest.mark.parametrize("total, every", [(None, 10), (3, 1), (60, 6), (1000, 100)])
def test_plain_line_interval(total, every):
    assert plain_line_interval(total) == every
