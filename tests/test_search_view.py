"""What a user sees of a search, end to end through the real console script: the progress lines in
a log, the dashboard rendered in headless Chromium, and `front --plot`'s page against the terminal.

One small study (the demo family, 7 trials, 2 finalists) is run once for the module.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
pytestmark = pytest.mark.slow


def evomerge_command() -> list[str]:
    """The installed console script (the CLI a user runs), else the module."""
    script = Path(sys.executable).with_name("evomerge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "evomerge.cli"]


def cli_env() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        COLUMNS="200",  # rich tables at full width: every cell whole
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, demo_family):
    root = tmp_path_factory.mktemp("view")
    data = {
        "models": [f"{skill}@{path}" for skill, path in demo_family.finetunes.items()],
        "base_model": f"base@{demo_family.base}",
        "dtype": "float32",
        "device": "cpu",
        "genome": {
            "layer_granularity": 2,
            "methods": ["task_arithmetic", "ties"],
            "lambda": [0.5, 2.0],
            "density": [0.3, 1.0],
        },
        "objectives": [
            {"task": f"demo_{s}", "metric": "acc,none", "selection_task": f"demo_{s}_select", "name": s}
            for s in demo_family.skills
        ],
        "eval": {"include_paths": [str(REPO / "tasks")], "limit": 10, "selection_limit": 10, "batch_size": 64},
        "search": {"sampler": "tpe", "seed": 0, "n_trials": 7, "study_name": "view", "finalists": 2},
    }
    space_file = root / "space.yml"
    space_file.write_text(yaml.safe_dump(data, sort_keys=False))
    # stderr is a pipe here, as in a log file, CI or a Ray job: progress comes as plain lines
    done = subprocess.run(
        [*evomerge_command(), "run", str(space_file)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=900,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return SimpleNamespace(
        space_file=space_file,
        root=root,
        stdout=done.stdout,
        stderr=done.stderr,
        storage_url=f"sqlite:///{root / 'view.db'}",
        names=list(demo_family.skills),
    )


def table_rows(text: str, first_column: str = "model") -> list[list[str]]:
    """The body rows of the first rich table in `text` whose header starts with `first_column`."""
    rows, inside = [], False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("┃") and line.strip("┃ ").startswith(first_column):
            inside = True
        elif inside and line.startswith("│"):
            rows.append([cell.strip() for cell in line.strip("│").split("│")])
        elif inside and line.startswith("└"):
            break
    return rows


def test_progress_shows_every_phase_and_the_best_as_the_final_table_does(finished_study):
    lines = [line for line in finished_study.stderr.splitlines() if line.startswith("evomerge: ")]
    assert lines[0].startswith("evomerge: loading sources, model and tasks (5 models)")
    assert "evomerge: scoring the parents as they are: 0/5" in lines
    assert "evomerge: scoring the parents as they are: 5/5 done" in lines
    search = [line for line in lines if re.match(r"evomerge: search: \d+/7 trials", line)]
    assert [int(re.search(r"(\d+)/7", line)[1]) for line in search] == list(range(1, 8))  # 7 trials: a line each
    assert all(", in flight " in line and ", front " in line and ", failed 0" in line for line in search)
    last = re.search(r"best (\d\.\d{3}) \(trial (\d+)\)", search[-1])
    assert last, search[-1]
    selection = re.fullmatch(r"evomerge: held-out scores of the parents and finalists: (\d+)/\1 done", lines[-1])
    assert selection and int(selection[1]) in (6, 7), lines[-1]  # the base, 4 parents, 1 or 2 finalists
    # the best shown during the search is that trial's mean in the final table
    final = {row[0].replace(" (best)", ""): row for row in table_rows(finished_study.stdout)}
    header_mean = 1 + len(finished_study.names)
    assert final[f"trial {last[2]}"][header_mean] == last[1]


def test_front_plot_page_shows_the_terminal_table(finished_study, tmp_path):
    png = tmp_path / "plots" / "front.png"
    done = subprocess.run(
        [*evomerge_command(), "front", str(finished_study.space_file), "--plot", str(png)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    terminal = table_rows(done.stdout)
    page = png.with_suffix(".html").read_text(encoding="utf-8")
    table = re.search(r'<table class="front"><thead><tr>(.*?)</tr></thead>\s*<tbody>(.*?)</tbody>', page, re.S)
    header = [html.unescape(c) for c in re.findall(r"<th>(.*?)</th>", table[1])]
    assert header == ["model", *finished_study.names, "mean", "held-out mean", "weights"]
    rows = re.findall(r"<tr( class=\"[a-z]+\")?>(.*?)</tr>", table[2])
    cells = [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)] for _, row in rows]
    assert cells == terminal  # the same rows, cell for cell: scores, mean, held-out mean, hash
    best = [row for (css, _), row in zip(rows, cells) if "best" in css]
    assert len(best) == 1 and best[0][0].endswith("(best)") and len(best[0][-1]) == 12
    assert [css for css, _ in rows[:5]] == [' class="reference"'] * 5  # base and the four parents
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"best: trial {best[0][0].split()[1]}" in page
    # the command `run` suggests, run again: the earlier plot is replaced, not refused
    png.write_bytes(b"an older plot")
    again = subprocess.run(
        [*evomerge_command(), "front", str(finished_study.space_file), "--plot", str(png), "--top", "0"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------- the dashboard in Chromium


def find_chromium() -> str | None:
    chosen = os.environ.get("EVOMERGE_TEST_CHROMIUM")
    if chosen and os.access(chosen, os.X_OK):
        return chosen
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def page_text(chromium: str, url: str, profile: Path, expect: str) -> str:
    """The rendered page's text (Chromium's DOM after the scripts ran), waiting for `expect` to show."""
    command = [
        chromium,
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    text = ""
    for _ in range(2):  # bounded: a slow machine may need another go for the data to arrive
        done = subprocess.run(command, capture_output=True, text=True, timeout=90)
        dom = re.sub(r"<(script|style|svg)\b.*?</\1>", " ", done.stdout, flags=re.S)
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))
        if expect in text:
            break
    return text


@pytest.fixture
def dashboard_url(finished_study):
    """optuna-dashboard's WSGI app on 127.0.0.1, a free port, in a thread (stopped after the test)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from optuna_dashboard import wsgi

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, wsgi(finished_study.storage_url), handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/dashboard"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_dashboard_shows_the_merge_in_a_real_browser(finished_study, dashboard_url, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "Chromium not found: run the tests under scripts/with-chromium.sh (installs Debian's "
            "chromium) or set EVOMERGE_TEST_CHROMIUM"
        )
    import optuna

    from evomerge.store.trial_store import TrialStore

    study = optuna.load_study(study_name="view", storage=finished_study.storage_url)
    best = study.user_attrs["evomerge_best_trial"]
    record = TrialStore(finished_study.storage_url).trial("view", best)
    scores = TrialStore(finished_study.storage_url).scores("view", "search")[best]
    held_out = TrialStore(finished_study.storage_url).scores("view", "selection")[best]
    names = finished_study.names
    values = [scores[f"demo_{n}"]["acc,none"] for n in names]
    base = f"{dashboard_url}/studies/{study._study_id}"

    # the study page: the objectives in value order, the best trial, the parents (study attributes)
    text = page_text(chromium, base, tmp_path / "profile", "evomerge: best")
    assert "values are, in order: " + ", ".join(names) in text
    assert f"evomerge: best trial {best} · mean {sum(values) / len(values):.3f}" in text
    assert f"weights {record.weights_hash[:12]}" in text
    assert "evomerge: reference base mean 0.000" in text
    assert "evomerge: enqueued trials trial 0: parent " in text

    # the study note: the front table with the parents as they are and the best marked
    text = page_text(chromium, f"{base}/note", tmp_path / "profile", "evomerge: study view")
    assert f"Best: trial {best}" in text
    assert all(f"{name} (as it is)" in text for name in ["base", *names])
    assert f"trial {best} (best)" in text and record.weights_hash[:12] in text

    # the best trial's page: each objective's name and score, mean, methods, hash, timings, held-out
    text = page_text(chromium, f"{base}/trials?numbers={best}", tmp_path / "profile", "User Attributes")
    for name, value in zip(names, values):
        assert f"score: {name} {round(value, 6)}" in text
        assert f"{name} {held_out[f'demo_{name}_select']['acc,none']:.3f}" in text  # the note's held-out table
    assert f"mean {round(sum(values) / len(values), 6)}" in text
    assert re.search(
        r"methods layers 0-1 (ties|task_arithmetic), layers 2-3 (ties|task_arithmetic)", text
    ) or re.search(r"methods layers 0-3 (ties|task_arithmetic)", text)
    assert f"weights hash {record.weights_hash}" in text
    assert re.search(r"seconds merge \d+\.\d\d · hash \d+\.\d\d · eval \d+\.\d\d · trial \d+\.\d\d", text)
    assert "Best trial of the study" in text

    # a parent's own trial says so
    text = page_text(chromium, f"{base}/trials?numbers=0", tmp_path / "profile", "User Attributes")
    assert re.search(r"role parent \w+ alone", text)
