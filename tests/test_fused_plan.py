"""A re-merge as one fused-kernel batch (evomerge/merge/fused_plan.py) against merge_tensors.

The batch skips merge_tensors' per-tensor Python but must give its bits for every recipe it
takes, leave to it every recipe it cannot take, and fail on bad parameters as it fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import random_family

from evomerge.merge import native, sparsify
from evomerge.merge.fused_plan import merge_in_place
from evomerge.merge.methods import DeltaCache, merge_tensors
from evomerge.merge.plan import MergePlan, TensorRecipe
from evomerge.merge.resident import ResidentSources, materialize
from evomerge.merge.seeds import tensor_seed

MODELS = ("base", "ft1", "ft2", "ft3")
# (method, per-model params, global params, whether the batch takes it)
RECIPES = [
    ("task_arithmetic", {"weight": 0.6}, {}, True),
    ("task_arithmetic", {"weight": -0.4}, {"normalize": True, "lambda": 1.7}, True),
    ("ties", {"weight": 0.7, "density": 0.4}, {}, True),
    ("ties", {"weight": 0.9, "density": 0.05}, {"normalize": False, "lambda": 0.6}, True),
    ("ties", {"weight": 0.5, "density": 0.5}, {"rescale": True}, False),  # needs the kept L1 norm first
    ("dare_ties", {"weight": 0.5, "density": 1.0}, {}, True),  # density 1: nothing to draw
    ("dare_ties", {"weight": 0.5, "density": 0.5}, {}, False),  # a mask to draw per tensor
    ("dare_linear", {"weight": 0.5, "density": 0.0}, {}, True),  # density 0: the delta is zeroed
    ("breadcrumbs", {"weight": 0.5, "density": 0.0}, {}, False),  # keeps signed zeros: a mask
    ("breadcrumbs_ties", {"weight": 0.5, "density": 0.3, "gamma": 0.05}, {}, False),
    ("slerp", {}, {"t": 0.3}, False),
    ("linear", {"weight": 0.5}, {}, False),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return random_family(tmp_path_factory.mktemp("fused_plan"), finetunes=3)


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv("EVOMERGE_NATIVE", "1")
    native.reset()
    if native.library() is None:
        pytest.skip("no C compiler here: the fused kernel cannot be built")
    yield
    native.reset()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32 if tensor.element_size() == 4 else torch.int16)


def recipe_for(name, shape, method, params, global_params, *, base_index=0):
    models = MODELS[:2] if method == "slerp" else MODELS
    model_params = tuple({} if i == base_index and method != "linear" else dict(params) for i in range(len(models)))
    if method == "slerp":
        model_params = ({}, {})
    return TensorRecipe(
        name=name, method=method, inputs=tuple((m, name) for m in models), base_index=base_index,
        model_params=model_params, global_params=dict(global_params), shape=tuple(shape),
    )  # fmt: skip


def mixed_plan(family, sources):
    """Every tensor of the family, the recipes dealt round-robin."""
    names = sorted(sources.tensors["base"])
    recipes = tuple(
        recipe_for(name, sources.get("base", name).shape, *RECIPES[i % len(RECIPES)][:3])
        for i, name in enumerate(names)
    )
    taken = {r.name for i, r in enumerate(recipes) if RECIPES[i % len(RECIPES)][3]}
    plan = MergePlan(
        models={m: family[m] for m in MODELS}, tensors=recipes, math_dtype=None, out_dtype=sources.dtype,
        config_donor="base", tokenizer_donor="base", num_hidden_layers=2,
    )  # fmt: skip
    return plan, taken


def expected(recipe, sources):
    return merge_tensors(
        recipe.method, [sources.get(*i) for i in recipe.inputs], recipe.model_params, recipe.global_params,
        recipe.base_index, seed=7,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_batch_takes_what_it_can_and_gives_merge_tensors_bits(kernel, family, dtype):
    sources = ResidentSources({m: family[m] for m in MODELS}, dtype=dtype)
    plan, taken = mixed_plan(family, sources)
    target = {r.name: torch.full(r.shape, float("nan"), dtype=dtype) for r in plan.tensors}
    rest = merge_in_place(plan, sources, target)
    assert {r.name for r in plan.tensors} - {r.name for r in rest} == taken
    assert len(taken) >= len(plan.tensors) // 3
    for recipe in plan.tensors:
        if recipe.name in taken:
            want = merge_tensors(
                recipe.method, [sources.get(*i) for i in recipe.inputs], recipe.model_params,
                recipe.global_params, recipe.base_index,
            )  # fmt: skip
            assert torch.equal(bits(target[recipe.name]), bits(want)), recipe
        else:
            assert torch.isnan(target[recipe.name]).all(), recipe  # untouched: left to merge_tensors


def test_materialize_equals_the_eager_path_on_two_threads(kernel, family, monkeypatch):
    """The whole re-merge, batch and rest, on two threads, against merge_tensors without the kernel."""
    sources = ResidentSources({m: family[m] for m in MODELS}, dtype=torch.bfloat16)
    plan, _ = mixed_plan(family, sources)
    target = {r.name: torch.empty(r.shape, dtype=torch.bfloat16) for r in plan.tensors}
    rest = merge_in_place(plan, sources, target, workers=2)
    materialize(plan, sources, target, workers=2)
    monkeypatch.setenv("EVOMERGE_NATIVE", "0")
    native.reset()
    for recipe in plan.tensors:
        want = merge_tensors(
            recipe.method, [sources.get(*i) for i in recipe.inputs], recipe.model_params, recipe.global_params,
            recipe.base_index, seed=tensor_seed(0, recipe.name),
        )  # fmt: skip
        assert torch.equal(bits(target[recipe.name]), bits(want)), recipe
    assert rest  # the mix left some recipes to merge_tensors


def test_targets_the_kernel_cannot_write_go_to_merge_tensors(kernel, family):
    sources = ResidentSources({m: family[m] for m in MODELS}, dtype=torch.float32)
    names = [n for n, t in sorted(sources.tensors["base"].items()) if t.dim() == 2][:2]
    recipes = tuple(
        recipe_for(n, sources.get("base", n).shape, "ties", {"weight": 0.5, "density": 0.3}, {}) for n in names
    )
    plan = MergePlan(
        models={m: family[m] for m in MODELS}, tensors=recipes, math_dtype=None, out_dtype=torch.float32,
        config_donor="base", tokenizer_donor="base", num_hidden_layers=2,
    )  # fmt: skip
    transposed = torch.empty(tuple(reversed(recipes[0].shape))).t()  # right shape, not contiguous
    target = {names[0]: transposed, names[1]: torch.empty(recipes[1].shape, dtype=torch.float64)}
    assert [r.name for r in merge_in_place(plan, sources, target)] == names
    materialize(plan, sources, target)
    for recipe in recipes:
        assert torch.equal(target[recipe.name].float(), expected(recipe, sources)), recipe.name


def test_bad_parameters_fail_as_merge_tensors_fails(kernel, family):
    sources = ResidentSources({m: family[m] for m in MODELS}, dtype=torch.float32)
    name = min(sources.tensors["base"])
    shape = sources.get("base", name).shape
    for params, global_params in (
        ({"density": 0.5}, {}),
        ({"weight": 1, "dens": 0.5}, {}),
        ({"weight": 1}, {"lamda": 2}),
    ):
        recipe = recipe_for(name, shape, "ties", params, global_params)
        plan = MergePlan(
            models={m: family[m] for m in MODELS}, tensors=(recipe,), math_dtype=None, out_dtype=torch.float32,
            config_donor="base", tokenizer_donor="base", num_hidden_layers=2,
        )  # fmt: skip
        with pytest.raises(ValueError) as direct:
            expected(recipe, sources)
        with pytest.raises(ValueError) as batched:
            materialize(plan, sources, {name: torch.empty(shape)})
        assert str(batched.value) == str(direct.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_histogram_form_gives_the_same_cut(kernel, family, dtype):
    """The kernel's kth_largest reads the running counts as int32 or int64, dense or sparse
    (KeyHistogram.of picks int64 only past 2^31 entries, which no test can afford to merge)."""
    sources = ResidentSources({m: family[m] for m in MODELS}, dtype=dtype)
    name = max(sources.tensors["base"], key=lambda n: sources.get("base", n).numel())
    recipe = recipe_for(name, sources.get("base", name).shape, "ties", {"weight": 0.8, "density": 0.35}, {})
    plan = MergePlan(
        models={m: family[m] for m in MODELS}, tensors=(recipe,), math_dtype=None, out_dtype=dtype,
        config_donor="base", tokenizer_donor="base", num_hidden_layers=2,
    )  # fmt: skip
    want = expected(recipe, sources)
    base = sources.get("base", name)
    forms = []
    for model in MODELS[1:]:
        counts = native.key_histogram(base, sources.get(model, name))
        filled = torch.nonzero(counts[1:]).reshape(-1) + 1
        zeros = int(counts[0])
        running = zeros + np.cumsum(counts[filled].numpy())
        first, last = int(filled[0]), int(filled[-1])
        dense = zeros + np.cumsum(counts[first : last + 1].numpy())
        forms.append([
            sparsify.KeyHistogram(zeros, dense.astype(np.int64), first),
            sparsify.KeyHistogram(zeros, running.astype(np.int64), first, filled.numpy().astype(np.int32)),
            sparsify.KeyHistogram(zeros, running.astype(np.int32), first, filled.numpy().astype(np.int32)),
        ])  # fmt: skip
    for form in range(3):
        fresh = ResidentSources({m: family[m] for m in MODELS}, dtype=dtype, tensor_names=[name])
        for row, model in enumerate(MODELS[1:]):
            key = DeltaCache.key((model, name), ("base", name), dtype)
            fresh.delta_cache._histograms[key] = forms[row][form]
        target = {name: torch.empty_like(base)}
        assert merge_in_place(plan, fresh, target) == []
        assert len(fresh.delta_cache) == len(MODELS) - 1  # the injected forms were read, none computed
        assert torch.equal(bits(target[name]), bits(want)), form


@pytest.mark.parametrize("mode, k", [(native.MASK, 0), (native.CUT, 0), (7, 0)])
def test_a_bad_job_fails_and_names_the_tensor(kernel, mode, k):
    """A mask mode without a mask, a TIES cut keeping nothing, an unknown mode: refused, not run."""
    batch = native.JobBatch()
    base = torch.zeros(8)
    out = torch.full((8,), 5.0)
    histogram = sparsify.KeyHistogram.of(native.key_histogram(base, base)).raw
    batch.add(torch.float32, 8, base.data_ptr(), out.data_ptr(), [base.data_ptr()], [1.0], [mode], [k],
              histograms=list(histogram), consensus=False, normalize=False,
              label="model.layers.0.mlp.up_proj.weight")  # fmt: skip
    with pytest.raises(RuntimeError, match="model.layers.0.mlp.up_proj.weight"):
        batch.run()
    assert torch.equal(out, torch.full((8,), 5.0))
