"""The IRT estimator in a search on the demo family: calibrate once, score anchors, re-score the front in full."""

from __future__ import annotations

import optuna
import pytest
import yaml
from test_search_e2e import run_cli, write_space

from evomerge.config.space import load_space
from evomerge.errors import ConfigError
from evomerge.search import calibration
from evomerge.store.trial_store import TrialStore

pytestmark = pytest.mark.slow

ESTIMATOR = {"anchors": 4, "calibration": 3, "check": 2, "method": "gp_irt"}


def with_estimator(space_file, **options):
    data = yaml.safe_load(space_file.read_text())
    data["eval"]["estimator"] = {**ESTIMATOR, **options}
    space_file.write_text(yaml.safe_dump(data, sort_keys=False))
    return space_file


def test_search_with_the_estimator_calibrates_once_and_rescores_the_front(tmp_path, demo_family, capsys, monkeypatch):
    space_file = with_estimator(write_space(tmp_path, demo_family, n_trials=9, limit=25))
    assert run_cli(["validate", str(space_file)]) == 0
    assert "estimator irt: gp_irt from up to 4 anchor items per task" in capsys.readouterr().out
    assert run_cli(["run", str(space_file), "-q"]) == 0
    out = capsys.readouterr().out
    assert "IRT estimator on" in out and "rho" in out

    space = load_space(space_file)
    study = optuna.load_study(study_name="e2e", storage=space.storage_url)
    stored = study.user_attrs[calibration.CALIBRATION_ATTR]
    assert len(stored["subjects"]) == 5 + 3  # base, four parents, three space-filling merges
    for task, fitted in stored["tasks"].items():
        assert len(fitted["items"]) == 25 and 1 <= len(fitted["anchors"]) <= 4, task
        assert sum(fitted["weights"]) == 25

    store = TrialStore(space.storage_url)
    assert set(store.references("e2e", "search")) == {"base", *demo_family.skills}  # recorded by the calibration
    scores = store.scores("e2e", "search")
    complete = [t.number for t in store.trials("e2e", status="complete")]
    assert len(complete) == 9
    # the calibration merges are trials too, scored on every item (no estimates); the rest carry estimates
    calibration_trials = [t.number for t in study.trials if t.user_attrs.get("seed") == "calibration"]
    assert calibration_trials == [5, 6, 7]  # after the five enqueued seeds
    assert all(
        calibration.is_full(space, scores[n]) and "acc,none|anchor" not in scores[n]["demo_sort"]
        for n in calibration_trials
    )
    for number in set(complete) - set(calibration_trials):  # estimates and how many items each was scored on
        assert {"acc,none|anchor", "acc,none|p_irt", "acc,none|gp_irt"} <= set(scores[number]["demo_sort"])
        assert 1 <= scores[number]["demo_sort"]["items|evaluated"] <= 4
    front = calibration.compute_front(space, store)
    assert front and all(calibration.is_full(space, scores[row.number]) for row in front)
    for row in front:  # the front's values are full-set ones: re-scored, or a calibration merge's own
        if row.number not in calibration_trials:
            assert row.search == [scores[row.number][o.task]["acc,none|full"] for o in space.objectives]
    # the parents alone (enqueued first) reproduce calibration models: marked, and left out of the fidelity
    marked = {n for n, s in scores.items() if calibration.CALIBRATED_TASK in s}
    assert marked == {0, 1, 2, 3}
    rescored = {n for n, s in scores.items() if calibration.is_full(space, s) and "acc,none|anchor" in s["demo_sort"]}
    assert len(rescored - marked) >= 2  # at least the `check` sample
    fidelity = study.user_attrs[calibration.FIDELITY_ATTR]
    assert fidelity["chosen"] == "gp_irt" and fidelity["gp_irt"]["n"] == len(rescored - marked)
    store.close()
    assert run_cli(["front", str(space_file)]) == 0  # the fidelity where the user looks
    assert "IRT estimator on" in capsys.readouterr().out

    # resume with a larger budget: the stored calibration is used, nothing is scored for it again
    def no_calibration(*args, **kwargs):
        raise AssertionError("a resumed study calibrated again")

    monkeypatch.setattr(calibration, "space_filling_genomes", no_calibration)
    assert run_cli(["run", str(space_file), "-q", "--n-trials", "11"]) == 0
    study = optuna.load_study(study_name="e2e", storage=space.storage_url)
    assert study.user_attrs[calibration.CALIBRATION_ATTR] == stored
    store = TrialStore(space.storage_url)
    assert len(store.trials("e2e", status="complete")) == 11
    store.close()


def test_a_non_binary_metric_is_refused_up_front(tmp_path, demo_family):
    space_file = with_estimator(write_space(tmp_path, demo_family))
    data = yaml.safe_load(space_file.read_text())
    data["objectives"][1]["metric"] = "brier_score,none"
    space_file.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match="binary per-item metric") as error:
        load_space(space_file)
    assert "objectives.1.metric: " in str(error.value) and len(str(error.value).splitlines()) == 1
