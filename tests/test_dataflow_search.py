"""A dataflow study end to end on the demo family: search, a trial failed for its path, export, SIGKILL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_search_e2e import assert_none_lost, sigkill_a_run_after

from evomerge.config.space import load_space
from evomerge.store.trial_store import TrialStore

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def write_dataflow_space(tmp_path: Path, family, *, n_trials=4, limit=10, name="dataflow.yml") -> Path:
    data = {
        "models": [f"{skill}@{path}" for skill, path in family.finetunes.items()],
        "base_model": f"base@{family.base}",
        "dtype": "float32",
        "device": "cpu",
        "genome": {
            "kind": "dataflow",
            "models": list(family.skills),
            "repeats": 1,
            "fix_ends": True,
            "min_depth": 3,
            "max_depth": 12,
            "scale": "pairs",
            "scale_range": [0.5, 1.5],
        },
        "objectives": [
            {"task": f"demo_{s}", "metric": "acc,none", "selection_task": f"demo_{s}_select", "name": s}
            for s in family.skills
        ],
        "eval": {"include_paths": [str(REPO / "tasks")], "limit": limit, "selection_limit": limit, "batch_size": 64},
        "search": {"sampler": "random", "seed": 0, "n_trials": n_trials, "study_name": "df", "finalists": 1},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_search_fails_a_too_deep_path_alone_then_exports_the_best(tmp_path, demo_family, monkeypatch):
    from transformers import AutoModelForCausalLM

    from evomerge.dataflow.path_model import build_path_model, load_sources
    from evomerge.errors import EvomergeError
    from evomerge.export import export_trial
    from evomerge.genome.kinds import make_genome
    from evomerge.io.hashing import checkpoint_hash
    from evomerge.search import loop
    from evomerge.search.runner import run_search

    space = load_space(write_dataflow_space(tmp_path, demo_family, n_trials=4))
    genome = make_genome(space)
    every_slot = {name: 1.0 for name in genome.distributions()}  # 16 slots + 2 fixed ends: deeper than 12

    def enqueue_too_deep(study, space, genome) -> int:
        study.enqueue_trial(every_slot)
        return 1

    monkeypatch.setattr(loop, "enqueue_seeds", enqueue_too_deep)
    summary = run_search(space, progress=False)
    store = TrialStore(space.storage_url)
    trials = store.trials("df")
    assert len(trials) == 4 and summary.n_complete + summary.n_failed == 4
    assert trials[0].status == "failed"
    assert trials[0].failure == "InvalidPathError: the path has 18 steps, more than genome.max_depth 12"
    for trial in trials[1:]:
        assert trial.status == "complete" or trial.failure.startswith("InvalidPathError: "), trial.failure
    assert summary.n_complete >= 1 and summary.front

    with pytest.raises(EvomergeError, match="trial 0 is failed"):
        export_trial(space, tmp_path / "failed", trial=0, progress=False)
    report = export_trial(space, tmp_path / "best", progress=False)
    record = store.trial("df", report.trial)
    assert report.verified and report.weights_hash == record.weights_hash == checkpoint_hash(tmp_path / "best")
    recipe = yaml.safe_load((tmp_path / "best" / "mergekit_config.yml").read_text())
    assert recipe["merge_method"] == "passthrough"

    path = genome.path(record.genome)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "best", dtype=torch.float32)
    assert exported.config.num_hidden_layers == len(path.steps)
    sources = load_sources({name: genome.paths[name] for name in path.models})
    in_memory, loaded = _logits(build_path_model(path, sources)), _logits(exported)
    # The tolerance of tests/test_dataflow_model.py: the fold is exact up to the norms' epsilon.
    torch.testing.assert_close(loaded, in_memory, rtol=0, atol=1e-3 * float(in_memory.abs().max()))


def test_sigkill_of_a_dataflow_search_resumes_to_n_trials(tmp_path, demo_family):
    n_trials = 8
    space_file = write_dataflow_space(tmp_path, demo_family, n_trials=n_trials, limit=5)
    space = load_space(space_file)
    before = sigkill_a_run_after(space_file, "df", finished=2, statuses=("complete", "failed"), timeout=120)

    from evomerge.cli import main

    try:
        main(["run", str(space_file), "-q"])
    except SystemExit as exc:
        assert not exc.code
    store = TrialStore(space.storage_url)
    assert_none_lost(before, store, "df")
    failed = store.trials("df", status="failed")
    assert all(t.failure.startswith(("interrupted", "InvalidPathError: ")) for t in failed)
    counted = [t for t in failed if not t.failure.startswith("interrupted")]
    assert len(store.trials("df", status="complete")) + len(counted) >= n_trials
    import optuna

    study = optuna.load_study(study_name="df", storage=space.storage_url)
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
