"""`evomerge export` on a tiny real study: the study and the user's files survive byte for byte,
a failing re-export keeps the earlier export, and the model card says what the model is, how it
scored beside its parents, which search chose it and how to reproduce it (issue 12, 1 and 3)."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_in_process import exit_code as run

from evomerge.io.output_dir import MARKER
from evomerge.store.trial_store import TrialStore

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but SQLite's shared-memory index (`*.db-shm`), which any reader of a
    WAL database rewrites while it is open."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith("-shm")
    }


def leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if "evomerge-staging" in p.name or "evomerge-old" in p.name]


@pytest.fixture(scope="module")
def study(tmp_path_factory, demo_family):
    """Three random-sampler trials over two parents, two layer groups, two methods (seconds)."""
    folder = tmp_path_factory.mktemp("study")
    skills = ["close", "sort"]
    space = {
        "models": [f"{s}@{demo_family.finetunes[s]}" for s in skills],
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
            {"task": f"demo_{s}", "metric": "acc,none", "selection_task": f"demo_{s}_select", "name": s} for s in skills
        ],
        "eval": {"include_paths": [str(REPO / "tasks")], "limit": 5, "selection_limit": 5, "batch_size": 64},
        "search": {"sampler": "random", "seed": 0, "n_trials": 3, "study_name": "tiny", "finalists": 1, "enqueue": []},
    }
    space_file = folder / "space.yml"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    assert run(["run", space_file, "-q"]) == 0
    assert not (folder / "tiny.db-wal").exists()  # `run` returned its connections: the log is in the file
    return space_file


def trials_by_shape(space_file: Path) -> dict[str, int]:
    """A trial whose groups chose one method ('single') and one with two ('multi')."""
    store = TrialStore(f"sqlite:///{space_file.parent / 'tiny.db'}")
    shapes = {}
    for record in store.trials("tiny", status="complete"):
        shapes.setdefault(
            "single" if record.genome["g0.method"] == record.genome["g1.method"] else "multi", record.number
        )
    assert set(shapes) == {"single", "multi"}, shapes  # fixed seed: the sampler draws both kinds
    return shapes


def test_export_never_touches_the_study_or_unrelated_files(study, tmp_path, capsys):
    study_dir = study.parent
    (study_dir / "notes.txt").write_text("my notes\n")
    kept = snapshot(study_dir)
    for target in (study_dir, study_dir.parent):
        assert run(["export", study, target, "-q", "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and ("space file" in err or "study database" in err), err
        assert snapshot(study_dir) == kept
    user = tmp_path / "mine"
    user.mkdir()
    (user / "README.md").write_text("mine\n")
    assert run(["export", study, user, "-q", "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (user / "README.md").read_text() == "mine\n" and sorted(p.name for p in user.iterdir()) == ["README.md"]
    for impossible in (study_dir / "tiny.db" / "export", "/proc/evomerge-test/export", tmp_path / ("x" * 300)):
        assert run(["export", study, impossible, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    assert snapshot(study_dir) == kept
    (study_dir / "notes.txt").unlink()
    assert leftovers(study_dir.parent) == [] and leftovers(tmp_path) == []


def test_a_failing_re_export_keeps_the_earlier_export(study, tmp_path, capsys):
    copy = tmp_path / "study"
    shutil.copytree(study.parent, copy)
    space = copy / "space.yml"
    out = tmp_path / "export"
    assert run(["export", space, out, "-q"]) == 0
    earlier = snapshot(out)
    assert run(["export", space, out, "-q"]) == 2  # not replaced silently
    assert "--overwrite" in capsys.readouterr().err
    number = int((out / "README.md").read_text().split("- trial: ")[1].split()[0])
    with sqlite3.connect(copy / "tiny.db") as db:  # the recorded hash no longer matches what the merge gives
        (recorded,) = db.execute("SELECT weights_hash FROM evomerge_trials WHERE number = ?", (number,)).fetchone()
        assert (
            db.execute("UPDATE evomerge_trials SET weights_hash = 'not-the-hash' WHERE number = ?", (number,)).rowcount
            == 1
        )
    assert run(["export", space, out, "-q", "--overwrite", "--trial", number]) == 2
    err = capsys.readouterr().err
    assert "differs from the hash recorded" in err and "left as it was" in err
    assert snapshot(out) == earlier
    assert leftovers(tmp_path) == []
    # and a re-export that works replaces the earlier one whole, with nothing left beside it
    with sqlite3.connect(copy / "tiny.db") as db:
        db.execute("UPDATE evomerge_trials SET weights_hash = ? WHERE number = ?", (recorded, number))
    assert run(["export", space, out, "-q", "--overwrite", "--trial", number]) == 0
    again = snapshot(out)
    assert again.pop("README.md") != earlier.pop("README.md")  # the card says the trial was picked with --trial
    assert again == earlier  # the same trial: the same weights, files and nothing else
    assert leftovers(tmp_path) == []


def test_the_card_and_recipe_reproduce_the_exported_model(study, tmp_path):
    shapes = trials_by_shape(study)
    for shape, number in shapes.items():
        out = tmp_path / f"export-{shape}"
        assert run(["export", study, out, "-q", "--trial", number]) == 0
        card = (out / "README.md").read_text()
        front_matter = card.split("---")[1]
        assert "base_model_relation: merge" in front_matter
        assert "base_model:" not in front_matter  # local folders are not Hub ids ...
        assert "local folder `" in card  # ... they are named as local folders in the text
        # scores: the objectives' metrics beside each parent's, no bookkeeping rows
        assert "| task | metric | this merge | base | close | sort |" in card
        assert "| demo_close | acc,none |" in card and "| demo_sort_select (held-out) | acc,none |" in card
        assert "sample_len" not in card and "stderr" not in card
        assert "- sampler: random (seed 0)" in card and "- trials: 3 complete, 0 failed" in card
        assert "- how this trial was chosen: picked by the user (--trial)" in card
        recipe = (out / "mergekit_config.yml").read_text()
        documents = [d for d in yaml.safe_load_all(recipe) if d]
        assert (len(documents) > 1) == (shape == "multi")
        assert ("mergekit-multi mergekit_config.yml" in card) == (shape == "multi")
        assert ("mergekit-yaml mergekit_config.yml" in card) == (shape == "single")
        for document in documents:  # every path is relative to the model folder, or a part's name
            for source in (s for out_slice in document.get("slices", []) for s in out_slice["sources"]):
                assert not Path(source["model"]).is_absolute()
                assert source["model"].startswith("part-") or (out / source["model"] / "config.json").is_file()
        # the command the card gives, run from the model folder, gives the same weights
        subprocess.run(
            [sys.executable, "-m", "evomerge.cli", "merge", "mergekit_config.yml", "../reproduced-" + shape, "-q"],
            cwd=out,
            check=True,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
            timeout=120,
        )
        reproduced = tmp_path / f"reproduced-{shape}"
        assert (reproduced / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
        assert MARKER in {p.name for p in out.iterdir()}

    best = tmp_path / "best"
    assert run(["export", study, best, "-q"]) == 0
    assert "held-out selection tasks" in (best / "README.md").read_text()
