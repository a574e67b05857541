"""PS+DFS on the demo family: a dataflow study whose slots include a trial of a parameter-space study."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_dataflow_search import _logits, write_dataflow_space
from test_search_e2e import write_space

from evomerge.config.space import load_space
from evomerge.store.trial_store import TrialStore

pytestmark = pytest.mark.slow


def _ps_dfs_space(tmp_path: Path, family, trials: list[dict], *, n_trials=3, name="ps_dfs.yml") -> Path:
    path = write_dataflow_space(tmp_path, family, n_trials=n_trials, limit=5, name=name)
    data = yaml.safe_load(path.read_text())
    data["genome"]["trials"] = trials
    if any(t["trial"] == "best" for t in trials):
        del data["genome"]["models"]  # the default: every fine-tune and every trial
    else:
        data["genome"]["models"] = [*family.skills, *(f"{t['study']}#{t['trial']}" for t in trials)]
    data["genome"]["max_depth"] = 16
    data["search"].update({"storage": "sqlite:///ps.db", "finalists": 0})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ps_study(tmp_path_factory, demo_family):
    from evomerge.search.runner import run_search

    tmp_path = tmp_path_factory.mktemp("ps")
    space = load_space(write_space(tmp_path, demo_family, n_trials=2, limit=5, storage="sqlite:///ps.db", finalists=0))
    run_search(space, progress=False)
    trials = TrialStore(space.storage_url).trials("e2e", status="complete")
    assert trials
    return tmp_path, trials[0]


def test_a_ps_trial_joins_the_pool_and_its_path_exports(ps_study, demo_family):
    from transformers import AutoModelForCausalLM

    from evomerge.dataflow.path_model import build_path_model
    from evomerge.dataflow.sources import build_sources
    from evomerge.export import export_trial
    from evomerge.genome.kinds import make_genome
    from evomerge.io.hashing import checkpoint_hash
    from evomerge.search import loop
    from evomerge.search.runner import run_search

    tmp_path, ps_trial = ps_study
    name = f"e2e#{ps_trial.number}"
    space = load_space(_ps_dfs_space(tmp_path, demo_family, [{"study": "e2e", "trial": ps_trial.number}]))
    genome = make_genome(space)
    assert name in genome.eligible and genome.trials[name].weights_hash == ps_trial.weights_hash
    # Every PS-trial slot on, every other slot off: the best path surely runs through the merged layers.
    ps_only = {g: float(s.model == name) for s in genome.slots for g in [s.use_gene]}
    ps_only.update({g: 1.0 for g in genome.distributions() if g.startswith("scale.")})

    def enqueue_ps_path(study, space, genome) -> int:
        study.enqueue_trial(ps_only)
        return 1

    monkey = pytest.MonkeyPatch()
    monkey.setattr(loop, "enqueue_seeds", enqueue_ps_path)
    try:
        summary = run_search(space, progress=False)
    finally:
        monkey.undo()
    store = TrialStore(space.storage_url)
    trials = store.trials("df")
    assert trials[0].status == "complete", trials[0].failure
    assert summary.n_complete >= 1

    out = tmp_path / "ps_dfs_out"
    report = export_trial(space, out, trial=0, progress=False)
    record = store.trial("df", 0)
    assert report.verified and report.weights_hash == record.weights_hash == checkpoint_hash(out)
    assert name in (out / "mergekit_config.yml").read_text()

    path = genome.path(record.genome)
    assert name in path.models
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    sources = build_sources(genome, path.models, dtype=torch.float32, device="cpu")
    in_memory, loaded = _logits(build_path_model(path, sources)), _logits(exported)
    torch.testing.assert_close(loaded, in_memory, rtol=0, atol=1e-3 * float(in_memory.abs().max()))


def test_best_resolves_to_a_completed_trial(ps_study, demo_family):
    from evomerge.genome.kinds import make_genome

    tmp_path, _ = ps_study
    space = load_space(_ps_dfs_space(tmp_path, demo_family, [{"study": "e2e", "trial": "best"}], name="best.yml"))
    genome = make_genome(space)
    (name,) = genome.trials
    assert name.startswith("e2e#") and name in genome.eligible  # models left to default: fine-tunes + trials


@pytest.mark.parametrize(
    ("trial", "message"),
    [
        ({"study": "nope", "trial": 0}, "no study named 'nope'"),
        ({"study": "e2e", "trial": 99}, "study 'e2e' has no trial 99"),
    ],
)
def test_a_missing_study_or_trial_is_one_config_line(ps_study, demo_family, trial, message):
    from evomerge.errors import ConfigError
    from evomerge.genome.kinds import make_genome

    tmp_path, _ = ps_study
    space_file = _ps_dfs_space(tmp_path, demo_family, [trial], name="bad.yml")
    data = yaml.safe_load(space_file.read_text())
    data["genome"]["models"] = list(demo_family.skills)
    space_file.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as error:
        make_genome(load_space(space_file))
    text = str(error.value)
    assert "genome.trials.0: " in text and message in text and "\n" not in text


def test_an_incomplete_trial_is_one_config_line(ps_study, demo_family):
    import sqlite3

    from evomerge.errors import ConfigError
    from evomerge.genome.kinds import make_genome

    tmp_path, ps_trial = ps_study
    copy = tmp_path / "copy"
    copy.mkdir(exist_ok=True)
    db = copy / "ps.db"
    with sqlite3.connect(tmp_path / "ps.db") as original, sqlite3.connect(db) as connection:
        original.backup(connection)  # a copy that includes what the write-ahead log holds
        connection.execute(
            "update evomerge_trials set status='failed' where study='e2e' and number=?", (ps_trial.number,)
        )
    trial = {"study": "e2e", "trial": ps_trial.number, "storage": f"sqlite:///{db}"}
    space_file = _ps_dfs_space(tmp_path, demo_family, [trial], name="incomplete.yml")
    with pytest.raises(ConfigError, match=rf"genome\.trials\.0: trial {ps_trial.number} of study 'e2e' is failed"):
        make_genome(load_space(space_file))


def test_a_ps_trial_whose_merge_changed_is_refused(ps_study, demo_family):
    from dataclasses import replace

    from evomerge.dataflow.sources import build_trial_model
    from evomerge.errors import EvomergeError
    from evomerge.genome.kinds import make_genome

    tmp_path, ps_trial = ps_study
    space = load_space(_ps_dfs_space(tmp_path, demo_family, [{"study": "e2e", "trial": ps_trial.number}]))
    (source,) = make_genome(space).trials.values()
    build_trial_model(source, dtype=torch.float32, device="cpu")  # the recorded hash: accepted
    with pytest.raises(EvomergeError, match="the PS study's models changed"):
        build_trial_model(replace(source, weights_hash="0" * 32), dtype=torch.float32, device="cpu")


def test_the_demo_ps_dfs_space_runs_as_written_after_the_ps_demo(tmp_path, demo_family):
    """search_spaces/demo_ps_dfs.yml in a copy of the repository layout, after a (short) PS demo search."""
    from evomerge.genome.kinds import make_genome
    from evomerge.search.runner import run_search

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "demo_models").symlink_to(demo_family.root)
    (tmp_path / "tasks").symlink_to(repo / "tasks")
    demo = yaml.safe_load((repo / "search_spaces" / "demo.yml").read_text())
    demo["device"] = "cpu"
    demo["eval"]["limit"] = demo["eval"]["selection_limit"] = 5
    demo["search"].update({"n_trials": 2, "finalists": 1})
    (tmp_path / "search_spaces" / "demo.yml").write_text(yaml.safe_dump(demo, sort_keys=False))
    ps_dfs = tmp_path / "search_spaces" / "demo_ps_dfs.yml"
    ps_dfs.write_text((repo / "search_spaces" / "demo_ps_dfs.yml").read_text())
    run_search(load_space(tmp_path / "search_spaces" / "demo.yml"), progress=False)
    genome = make_genome(load_space(ps_dfs))
    (name,) = genome.trials
    assert name.startswith("demo#") and genome.eligible == ["close", "reverse", "shift", "sort", name]
