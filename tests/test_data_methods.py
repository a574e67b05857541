"""Data merge methods (fisher, regmean): the math, the statistics, their cache and `evomerge merge` with data:."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from families import load_checkpoint, tiny_config

from evomerge.config.mergekit_yaml import load_merge_config
from evomerge.data_stats.cache import StatisticsRequest, ensure_statistics, statistics_key
from evomerge.data_stats.compute import continuation_logprob, fisher_diagonal, gram_matrices
from evomerge.data_stats.for_plan import attach_statistics
from evomerge.merge.methods import merge_tensors
from evomerge.merge.planner import plan_merge
from evomerge.merge.resident import ResidentSources, materialize

REPO = Path(__file__).resolve().parent.parent
EVOMERGE = Path(sys.executable).with_name("evomerge")


def evomerge(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EVOMERGE_DEBUG": "", "COLUMNS": "100"}
    return subprocess.run([str(EVOMERGE), *argv], env=env, capture_output=True, text=True, timeout=300)


# -- fisher math -----------------------------------------------------------------------------------
def fisher(tensors, fishers, floor=1e-6, weights=None):
    params = [{"weight": w} for w in weights] if weights else [{} for _ in tensors]
    return merge_tensors("fisher", tensors, params, {"fisher_floor": floor}, None, statistics=fishers)


def test_fisher_equal_fishers_give_the_average():
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    same = torch.rand(3, 4, dtype=torch.float64) + 0.1
    assert torch.allclose(fisher([a, b], [same, same.clone()]), (a + b) / 2)


def test_fisher_floor_turns_zero_fishers_into_the_average_and_floors_small_ones():
    a, b = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 6.0], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    assert torch.allclose(fisher([a, b], [zero, zero]), torch.tensor([2.0, 4.0], dtype=torch.float64))
    # F_a = 1e-9 is floored to 0.5 (as large as F_b): the average again
    tiny, half = torch.full((2,), 1e-9, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    assert torch.allclose(fisher([a, b], [tiny, half], floor=0.5), torch.tensor([2.0, 4.0], dtype=torch.float64))


def test_fisher_one_dominant_model_wins_entry_by_entry():
    a, b = torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([-1.0, -1.0], dtype=torch.float64)
    fa = torch.tensor([1e6, 1e-6], dtype=torch.float64)
    fb = torch.tensor([1e-6, 1e6], dtype=torch.float64)
    merged = fisher([a, b], [fa, fb])
    assert torch.allclose(merged, torch.tensor([1.0, -1.0], dtype=torch.float64), atol=1e-9)
    # hand value: (3*1*1 + 1*1*(-1)) / (3 + 1) with per-model weights 3 and 1
    ones = torch.ones(2, dtype=torch.float64)
    assert torch.allclose(fisher([a, b], [ones, ones], weights=[3.0, 1.0]), torch.full((2,), 0.5, dtype=torch.float64))


def test_a_data_method_without_statistics_is_an_error():
    with pytest.raises(ValueError, match="data"):
        merge_tensors("fisher", [torch.zeros(2), torch.ones(2)], [{}, {}], {}, None)


# -- regmean math ----------------------------------------------------------------------------------
def test_regmean_alpha_one_is_the_least_squares_solution():
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(40, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    weights = [torch.randn(5, 6, generator=gen, dtype=torch.float64) for _ in range(3)]  # [out, in]
    grams = [x.T @ x for x in inputs]
    merged = merge_tensors("regmean", weights, [{}] * 3, {"alpha": 1.0}, None, statistics=grams)
    # min_W sum_i ||X_i W^T - X_i W_i^T||^2: stack the problems and solve by least squares
    stacked_x = torch.cat(inputs)
    stacked_y = torch.cat([x @ w.T for x, w in zip(inputs, weights)])
    direct = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    assert torch.allclose(merged, direct, atol=1e-10)


def test_regmean_shrinkage_zero_is_a_per_column_weighted_average_and_others_are_averaged():
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    grams = [torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)) + 5.0 for _ in range(2)]
    # alpha = 0 keeps only diagonals; equal diagonals: the plain average
    merged = merge_tensors("regmean", weights, [{}] * 2, {"alpha": 0.0}, None, statistics=grams)
    assert torch.allclose(merged, (weights[0] + weights[1]) / 2)
    norms = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(2)]
    averaged = merge_tensors("regmean", norms, [{}] * 2, {"alpha": 0.1}, None, statistics=[None, None])
    assert torch.allclose(averaged, (norms[0] + norms[1]) / 2)


# -- statistics on a tiny model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config("llama", layers=2)).eval()


EXAMPLES = [([5, 6, 7], [8, 9]), ([10, 11], [12]), ([3, 4, 5, 6], [7, 8, 9])]


def test_gram_via_hooks_equals_inputs_gram_by_hand(tiny_llama):
    grams = gram_matrices(tiny_llama, EXAMPLES)
    captured = []
    handle = tiny_llama.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].reshape(-1, inputs[0].shape[-1]).double())
    )
    try:
        with torch.no_grad():
            for context, continuation in EXAMPLES:
                tiny_llama(torch.tensor([(context + continuation)[:-1]]))
    finally:
        handle.remove()
    x = torch.cat(captured)
    assert torch.allclose(grams["model.layers.1.mlp.down_proj.weight"].double(), x.T @ x, rtol=1e-5, atol=1e-5)
    assert grams["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)


def test_fisher_diagonal_is_the_sum_of_squared_per_example_gradients(tiny_llama):
    computed = fisher_diagonal(tiny_llama, EXAMPLES)
    name = "model.layers.0.mlp.up_proj.weight"
    parameter = dict(tiny_llama.named_parameters())[name]
    naive = torch.zeros_like(parameter)
    for example in EXAMPLES:
        (gradient,) = torch.autograd.grad(continuation_logprob(tiny_llama, example), [parameter])
        naive += gradient**2
    assert torch.allclose(computed[name], naive / len(EXAMPLES), rtol=1e-5, atol=1e-12)
    assert computed[name].abs().sum() > 0


# -- the cache -----------------------------------------------------------------------------------------
def test_cache_hit_reuses_the_file_and_the_key_follows_the_settings(tmp_path, demo_family):
    calls = []

    def compute(request, device):
        calls.append(request)
        return {"w": torch.full((2,), float(len(calls)))}

    request = StatisticsRequest("fisher", demo_family.finetunes["sort"], ("demo_sort",), (REPO / "tasks",), 8, 0)
    first = ensure_statistics(request, tmp_path, compute=compute)
    stamp = first.path.stat().st_mtime_ns
    second = ensure_statistics(request, tmp_path, compute=compute)
    assert first.computed and not second.computed and len(calls) == 1
    assert second.path == first.path and first.path.stat().st_mtime_ns == stamp
    key = statistics_key(request)
    changed = [
        StatisticsRequest("fisher", request.model_dir, request.tasks, request.include_paths, 16, 0),
        StatisticsRequest("fisher", request.model_dir, request.tasks, request.include_paths, 8, 1),
        StatisticsRequest("gram", request.model_dir, request.tasks, request.include_paths, 8, 0),
        StatisticsRequest("fisher", request.model_dir, ("demo_shift",), request.include_paths, 8, 0),
        StatisticsRequest("fisher", demo_family.finetunes["shift"], request.tasks, request.include_paths, 8, 0),
    ]
    assert len({key, *(statistics_key(other) for other in changed)}) == 1 + len(changed)


@pytest.fixture
def in_process(capsys, monkeypatch):
    """`main(argv)` in this process, answered as `evomerge` above is: for the refusals, whose exit
    status and one line are the same there and cost no interpreter start-up (nor, when an earlier
    test built it, a second index of lm-eval's built-in tasks: harness caches it per process)."""
    from cli_in_process import captured

    monkeypatch.delenv("EVOMERGE_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "100")
    return lambda *argv: captured(capsys, *argv)


# -- evomerge merge with data: -----------------------------------------------------------------------
def write_config(path: Path, family, method: str, data: str | None) -> Path:
    models = "".join(f"  - model: {family.finetunes[s]}\n" for s in family.skills)
    text = f"merge_method: {method}\nbase_model: {family.base}\nmodels:\n{models}dtype: float32\n"
    path.write_text(text + (data or ""))
    return path


def data_section(family, examples: int = 8, task: str = "demo_{skill}") -> str:
    mapping = "".join(f"    {family.finetunes[s]}: [{task.format(skill=s)}]\n" for s in family.skills)
    return (
        f"data:\n  tasks:\n{mapping}  include_paths: [{REPO / 'tasks'}]\n  examples: {examples}\n  cache_dir: stats\n"
    )


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_merge_with_data_writes_a_loadable_model_and_reuses_statistics(tmp_path, demo_family, method):
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path / "merge.yaml", demo_family, method, data_section(demo_family))
    result = evomerge("merge", str(config), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(next(model.parameters())).all()
    files = sorted((tmp_path / "stats").iterdir())
    assert len(files) == len(demo_family.skills)
    if method == "fisher":  # a second merge reads the cached statistics (one rerun keeps the test short)
        stamps = [f.stat().st_mtime_ns for f in files]
        # from the recipe written beside the output: its models, tasks and cache follow it there
        again = evomerge("merge", str(tmp_path / "out" / "mergekit_config.yml"), str(tmp_path / "out2"), "--quiet")
        assert again.returncode == 0, again.stderr
        assert sorted((tmp_path / "stats").iterdir()) == files and [f.stat().st_mtime_ns for f in files] == stamps
        first, second = load_checkpoint(tmp_path / "out"), load_checkpoint(tmp_path / "out2")
        assert all(torch.equal(first[name], second[name]) for name in first)
    merged, sources = (
        load_checkpoint(tmp_path / "out"),
        [load_checkpoint(demo_family.finetunes[s]) for s in demo_family.skills],
    )
    name = "model.layers.0.self_attn.q_proj.weight"
    average = sum(source[name] for source in sources) / len(sources)
    assert not torch.allclose(merged[name], average, atol=1e-6)  # the statistics changed the result
    # A search's in-place merge, the statistics resident like the sources, writes the same weights.
    document = load_merge_config(config)
    plan, results = attach_statistics(
        plan_merge(document, config_path=config), document, config_path=config, out_dir=tmp_path / "out"
    )
    assert results and not any(result.computed for result in results)
    target = {recipe.name: torch.empty(recipe.shape) for recipe in plan.tensors}
    materialize(plan, ResidentSources(plan.models, dtype=torch.float32), target)
    assert all(torch.equal(target[name], merged[name]) for name in merged)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, "data: fisher needs data"),
        ("unknown", "data.tasks.{first}.0: unknown lm-eval task 'demo_nope'"),
    ],
)
def test_bad_data_is_one_line_exit_2(tmp_path, demo_family, data, expected, in_process):
    section = data_section(demo_family, task="demo_nope") if data else None
    config = write_config(tmp_path / "merge.yaml", demo_family, "fisher", section)
    result = in_process("merge", str(config), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 2
    expected = expected.format(first=demo_family.finetunes[demo_family.skills[0]])
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "stats").exists()


# -- a search with a data method -------------------------------------------------------------------
def data_space(tmp_path: Path, family, methods: list[str], data: dict | None) -> Path:
    import yaml
    from test_search_e2e import write_space

    path = write_space(tmp_path, family, n_trials=3, limit=8, finalists=1, enqueue=[])
    space = yaml.safe_load(path.read_text())
    space["genome"] = {"layer_granularity": 2, "methods": methods, "alpha": [0.1, 0.9]}
    if data is not None:
        space["data"] = data
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def test_search_with_regmean_exports_weights_evomerge_merge_reproduces(tmp_path, demo_family, capsys):
    from test_search_e2e import run_cli

    data = {"tasks": [f"demo_{s}" for s in demo_family.skills], "include_paths": [str(REPO / "tasks")], "examples": 16}
    space_file = data_space(tmp_path, demo_family, ["task_arithmetic", "regmean"], data)
    assert run_cli(["run", str(space_file), "-q"]) == 0
    files = sorted((tmp_path / ".evomerge-stats").iterdir())  # the default cache, beside the space file
    assert len(files) == len(demo_family.skills) and all(f.name.startswith("gram-") for f in files)
    from evomerge.config.space import load_space
    from evomerge.store.trial_store import TrialStore

    trials = TrialStore(load_space(space_file).storage_url).trials("e2e")
    assert len(trials) == 3 and all(t.status == "complete" for t in trials)
    assert any("regmean" in t.genome.values() for t in trials)  # a trial merged with the data method
    regmean = next(t for t in trials if "regmean" in t.genome.values())
    assert "data:" in regmean.plan_yaml and "alpha:" in regmean.plan_yaml
    capsys.readouterr()
    export = tmp_path / "export"
    assert run_cli(["export", str(space_file), str(export), "--trial", str(regmean.number), "-q"]) == 0
    assert "matches the scored model" in capsys.readouterr().out
    stamps = [f.stat().st_mtime_ns for f in files]
    again = evomerge("merge", str(export / "mergekit_config.yml"), str(tmp_path / "again"), "--quiet")
    assert again.returncode == 0, again.stderr
    assert [f.stat().st_mtime_ns for f in files] == stamps  # the search's statistics, reused
    exported, merged = load_checkpoint(export), load_checkpoint(tmp_path / "again")
    assert exported.keys() == merged.keys() and all(torch.equal(exported[n], merged[n]) for n in exported)


@pytest.mark.parametrize(
    ("methods", "data", "expected"),
    [
        (["fisher"], {"tasks": {"sort": ["demo_sort"]}}, "data.tasks: no tasks for model 'reverse' (needed by fisher)"),
        (["fisher", "regmean"], None, "list at most one data method, got fisher, regmean"),
    ],
)
def test_a_search_space_with_a_data_method_and_no_tasks_is_one_line_exit_2(
    tmp_path, demo_family, methods, data, expected, in_process
):
    space_file = data_space(tmp_path, demo_family, methods, data)
    result = in_process("run", str(space_file), "-q")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr


def test_a_space_without_data_gives_every_fine_tune_the_objectives_tasks(tmp_path, demo_family):
    from evomerge.config.space import load_space
    from evomerge.errors import ConfigError

    space = load_space(data_space(tmp_path, demo_family, ["task_arithmetic", "fisher"], None))
    data = space.data_section()
    assert data.tasks == [f"demo_{s}" for s in demo_family.skills]
    assert data.include_paths == [str(REPO / "tasks")] and data.tasks_for("sort") == data.tasks
    assert load_space(data_space(tmp_path, demo_family, ["task_arithmetic"], None)).data_section() is None
    given = {"tasks": {s: [f"demo_{s}"] for s in demo_family.skills}, "include_paths": ["tasks"], "cache_dir": "st"}
    with pytest.raises(ConfigError, match="data.include_paths.0: .*tasks is not a folder of lm-eval task YAMLs"):
        load_space(data_space(tmp_path, demo_family, ["regmean"], given))
    (tmp_path / "tasks").mkdir()
    space = load_space(data_space(tmp_path, demo_family, ["regmean"], given))
    assert space.data_section().tasks_for("sort") == ["demo_sort"]
    assert space.data.include_paths == [str(tmp_path / "tasks")]  # relative to the space file
    assert space.data.cache_dir == str(tmp_path / "st")


def test_a_data_method_refuses_a_lora_adapter_in_one_line(tmp_path, demo_family, in_process):
    """An adapter's statistics would be its base's: refused, not measured on the wrong model."""
    from test_lora import make_adapter

    adapter = make_adapter(demo_family.base, tmp_path / "adapter", 0, r=4, lora_alpha=8, target_modules=["q_proj"])
    skill = demo_family.skills[0]
    text = (
        f"merge_method: fisher\nbase_model: {demo_family.base}\nmodels:\n"
        f"  - model: {demo_family.base}+{adapter}\n  - model: {demo_family.finetunes[skill]}\ndtype: float32\n"
        f"data:\n  tasks: [demo_{skill}]\n  include_paths: [{REPO / 'tasks'}]\n  examples: 4\n  cache_dir: stats\n"
    )
    config = tmp_path / "merge.yaml"
    config.write_text(text)
    result = in_process("merge", str(config), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "is a LoRA adapter" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
