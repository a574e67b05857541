"""A search's fisher/regmean data is checked by `validate` and by `run` before anything heavy:
a task lm-eval does not know, a generation-only task or one without gold answers is one line
naming the field, exit 2, with no model loaded, no statistic computed and no study written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_config_errors import _validate
from test_data_methods import data_space
from test_search_e2e import REPO, run_cli

DATA_FILE = REPO / "tasks" / "data" / "reverse_search.jsonl"
TASK_HEAD = (
    f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {DATA_FILE}\n"
    'test_split: test\ndoc_to_text: "{{question}}"\n'
)
BROKEN_TASKS = {  # each readable by lm-eval, none able to give a statistic its examples
    "demo_gen": "output_type: generate_until\ndoc_to_target: answer\n"
    'generation_kwargs:\n  until: ["\\n"]\nmetric_list:\n  - metric: exact_match\n',
    "demo_nogold": 'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{question}}"\n'
    "metric_list:\n  - metric: acc\n",
}


def broken_tasks(folder: Path) -> Path:
    folder.mkdir()
    for name, body in BROKEN_TASKS.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{TASK_HEAD}{body}")
    return folder


def per_model_data(family, tasks: dict[str, str], *include: Path) -> dict:
    """Every fine-tune its own demo task, except those `tasks` gives another."""
    return {
        "tasks": {skill: [tasks.get(skill, f"demo_{skill}")] for skill in family.skills},
        "include_paths": [str(REPO / "tasks"), *map(str, include)],
        "examples": 8,
    }


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("demo_revers", "data.tasks.{skill}.0: unknown lm-eval task 'demo_revers'"),
        ("demo_gen", "data.tasks.{skill}.0: task 'demo_gen' is generate_until: fisher takes its examples from"),
        ("demo_nogold", "data.tasks.{skill}.0: none of the first 8 documents of task 'demo_nogold' has its gold"),
    ],
)
def test_validate_refuses_data_tasks_a_statistic_cannot_use(tmp_path, demo_family, capsys, task, expected):
    skill = demo_family.skills[1]
    broken = [broken_tasks(tmp_path / "broken")] if task in BROKEN_TASKS else []  # else the run test's include paths
    data = per_model_data(demo_family, {skill: task}, *broken)
    space_file = data_space(tmp_path, demo_family, ["task_arithmetic", "fisher"], data)
    code, _, err = _validate([str(space_file)], capsys)
    line = one_line_error(code, err)
    assert str(space_file) in line and expected.format(skill=skill) in line, line


def test_run_refuses_an_unknown_data_task_before_writing_the_study(tmp_path, demo_family, capsys):
    data = per_model_data(demo_family, {demo_family.skills[0]: "demo_nope"})
    space_file = data_space(tmp_path, demo_family, ["regmean"], data)
    code = run_cli(["run", str(space_file), "-q"])
    line = one_line_error(code, capsys.readouterr().err)
    assert f"data.tasks.{demo_family.skills[0]}.0: unknown lm-eval task 'demo_nope'" in line, line
    # validate writes nothing; neither does a run refused by the same checks (no study database, no statistics)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["space.yml"]


def test_the_objectives_tasks_as_data_are_checked_with_their_own_fields(tmp_path, demo_family, capsys):
    space_file = data_space(tmp_path, demo_family, ["fisher"], None)
    space = yaml.safe_load(space_file.read_text())
    space["objectives"][1].update(task="demo_gen", metric="exact_match,none")
    space["objectives"][1].pop("selection_task")
    space["eval"]["include_paths"].append(str(broken_tasks(tmp_path / "broken")))
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    code, _, err = _validate([str(space_file)], capsys)
    line = one_line_error(code, err)
    assert "objectives.1.task: task 'demo_gen' is generate_until" in line and "no data: section" in line, line


@pytest.mark.parametrize("given", [True, False])
def test_a_usable_data_section_passes_validate_with_its_check_line(tmp_path, demo_family, capsys, given):
    data = per_model_data(demo_family, {}) if given else None
    space_file = data_space(tmp_path, demo_family, ["task_arithmetic", "regmean"], data)
    code, out, err = _validate([str(space_file)], capsys)
    assert code == 0, err
    count = len(demo_family.skills)
    assert f"data: {count} task(s) load and give regmean gold-answer examples for {count} fine-tunes" in out, out
    assert not (tmp_path / ".evomerge-stats").exists()  # checked, not computed


def test_validate_of_a_merge_file_checks_its_data_like_merge(tmp_path, demo_family, capsys):
    from test_data_methods import data_section, write_config

    config = write_config(tmp_path / "merge.yaml", demo_family, "fisher", data_section(demo_family, task="demo_nope"))
    code, _, err = _validate([str(config)], capsys)
    first = demo_family.finetunes[demo_family.skills[0]]
    assert f"data.tasks.{first}.0: unknown lm-eval task 'demo_nope'" in one_line_error(code, err)
    good = write_config(tmp_path / "good.yaml", demo_family, "fisher", data_section(demo_family))
    code, out, err = _validate([str(good)], capsys)
    count = len(demo_family.skills)
    assert code == 0 and f"data: {count} task(s) load and give fisher gold-answer examples" in out, err


def test_an_adapter_fine_tune_in_a_fisher_search_is_refused_by_validate(tmp_path, demo_family, capsys):
    from test_lora import make_adapter

    adapter = make_adapter(demo_family.base, tmp_path / "adapter", 0, r=4, lora_alpha=8, target_modules=["q_proj"])
    space_file = data_space(tmp_path, demo_family, ["fisher"], per_model_data(demo_family, {}))
    space = yaml.safe_load(space_file.read_text())
    skill = demo_family.skills[0]
    space["models"][0] = f"{skill}@{demo_family.base}+{adapter}"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    capsys.readouterr()  # make_adapter's own loading bar
    code, _, err = _validate([str(space_file)], capsys)
    line = one_line_error(code, err)
    assert f"genome.methods: model '{skill}' is a LoRA adapter" in line, line


def test_a_statistics_cache_that_cannot_be_a_folder_is_refused_by_validate(tmp_path, demo_family, capsys):
    data = {**per_model_data(demo_family, {}), "cache_dir": "space.yml"}  # the space file itself
    space_file = data_space(tmp_path, demo_family, ["fisher"], data)
    code, _, err = _validate([str(space_file)], capsys)
    line = one_line_error(code, err)
    assert "data.cache_dir: the statistics cache: " in line and "exists and is not a folder" in line, line


def test_a_donor_without_a_tokenizer_is_refused_by_validate_not_by_each_worker(tmp_path, demo_family, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(demo_family.base / name, bare / name)
    space_file = data_space(tmp_path, demo_family, ["task_arithmetic"], None)
    space = yaml.safe_load(space_file.read_text())
    space["base_model"] = f"base@{bare}"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    code, _, err = _validate([str(space_file)], capsys)
    line = one_line_error(code, err)
    assert f"base_model: {bare} has no tokenizer that loads" in line, line
