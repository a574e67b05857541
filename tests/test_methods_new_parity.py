"""Parity with mergekit 0.1.5 of the seven methods in evomerge/merge/family that it added.

mergekit runs through its in-memory API (`mergekit.merge_methods.merge_tensors`, the kernels
`mergekit-yaml` runs); ours through the public entry every method takes,
`evomerge.merge.methods.merge_tensors` (validation, parameter resolution, the specs' checks, the
cast to the base dtype). mergekit returns bf16 merges of arcee_fusion and ramplus_tl as float32
(a float32 mask or boost promotes them); we return the base dtype, so those are compared after
the same cast.

Tolerances, per method:
* nearswap, ram, ramplus_tl, arcee_fusion: bit for bit (the same ops in the same dtypes; for
  arcee_fusion's sampled quartiles mergekit is made to draw our sample).
* sce, multislerp: bit for bit in bf16 (our float64 sums round to the same bf16 scalars);
  float32 to 1e-6 relative on small tensors, as their scalar sums are float32 in mergekit,
  float64 here; on large tensors mergekit's float32 norms drift further (~1e-5 relative at 512K
  entries) while ours stay within 1e-6 of the float64 math (tested against it).
* karcher: float32 to 1e-5 relative (the scalars feed an iteration); bf16 within bf16 rounding
  of mergekit's own math run in float64, and no further from it than mergekit's bf16 result;
  bit for bit in both when mergekit's norms and dots are our float64 sums (its only difference).
* float64 inputs: 1e-12 everywhere.
One deliberate difference is tested as such: multislerp's weights summing to ~0 are not divided
by that sum (linear's rule), where mergekit's become inf/NaN.
"""

from __future__ import annotations

import math
import types
from typing import Any

import pytest
import torch

pytest.importorskip("mergekit")

import mergekit.merge_methods.arcee_fusion as mk_arcee_fusion  # noqa: E402
import mergekit.merge_methods.karcher as mk_karcher  # noqa: E402
from mergekit import merge_methods as mk_methods  # noqa: E402
from mergekit.merge_methods import merge_tensors as mk_merge_tensors  # noqa: E402

from evomerge.merge import registry  # noqa: E402
from evomerge.merge.family import arcee_fusion, multislerp, sce  # noqa: E402
from evomerge.merge.family.common import WEIGHT, dot64, norm64  # noqa: E402
from evomerge.merge.methods import METHODS, check_parameters, merge_tensors  # noqa: E402
from evomerge.merge.registry import MethodSpec  # noqa: E402
from evomerge.merge.sparsify import make_generator  # noqa: E402

BF16 = torch.bfloat16
F32 = torch.float32
# mergekit's registry order.
NEW_METHODS = ["multislerp", "nearswap", "ram", "ramplus_tl", "sce", "arcee_fusion", "karcher"]
SPECS: dict[str, MethodSpec] = {name: METHODS[name] for name in NEW_METHODS}
SHAPES = [(24, 40), (97,), (3,)]  # a matrix, a bias, a tiny tensor of < 4 entries


def evomerge_merge(
    name: str,
    tensors: list[torch.Tensor],
    model_params: list[dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
    base_index: int | None = None,
    seed: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Our merge through the public entry point, as the engine calls it."""
    params = model_params or [{} for _ in tensors]
    return merge_tensors(name, tensors, params, options or {}, base_index, seed=seed, out=out)


def mergekit_merge(name, tensors, model_params=None, options=None, base_index=None) -> torch.Tensor:
    """The same merge through mergekit: per-model parameters keyed by input index, base excluded."""
    parameters = dict(options or {})
    for param in SPECS[name].params:
        if param.scope == "model":
            parameters[param.name] = {i: p[param.name] for i, p in enumerate(model_params) if i != base_index}
    return mk_merge_tensors(list(tensors), name, parameters=parameters, base_index=base_index)


def random_inputs(count, shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(count)]


def sparse_task_vectors(count, shape, dtype, keep=0.5, seed=0):
    """A base and count-1 models that each change about `keep` of its entries: RAM's overlaps."""
    base, *others = random_inputs(count, shape, F32, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    changed = [base + (other - base) * (torch.rand(shape, generator=generator) < keep) for other in others]
    return [tensor.to(dtype) for tensor in [base, *changed]]


def assert_same(ours, theirs, dtype):
    """Bit parity, after casting mergekit's result to the base dtype we return."""
    assert ours.dtype == dtype
    assert torch.equal(ours, theirs.to(dtype))


def assert_float32_close(ours, theirs, rtol):
    assert ours.dtype == theirs.dtype == F32
    scale = max(1.0, theirs.abs().max().item())
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * scale)


def assert_bf16_agrees(ours, theirs, reference):
    """ours and mergekit's bf16 results may differ by a bf16 step where a scalar rounds apart; the
    reference is mergekit's math on the same inputs in float64: ours must be within two bf16 steps
    (at the largest magnitude) of it and no further from it than mergekit's own result (plus half
    a step)."""
    assert ours.dtype == theirs.dtype == BF16
    step = 2.0 ** (math.floor(math.log2(reference.abs().max().item())) - 7)
    ours_error = (ours.double() - reference).abs().max().item()
    theirs_error = (theirs.double() - reference).abs().max().item()
    assert ours_error <= 2 * step
    assert ours_error <= theirs_error + step / 2


# -- the declarations match mergekit's ----------------------------------------------------------------
BASE_POLICIES = {"required": "required", "optional": "optional", "unused": "ignored"}


@pytest.mark.parametrize("name", list(SPECS))
def test_spec_declares_mergekit_parameters_and_inputs(name):
    ours, theirs = SPECS[name], mk_methods.get(name).spec
    declared = [(p.name, p.scope, p.default) for p in ours.params]
    expected = [
        (p.name, "global" if p.scope.value == "shared" else "model", None if p.required else p.default)
        for p in theirs.parameters
    ]
    assert declared == expected
    assert all(p.is_bool == (q.value_type is bool) for p, q in zip(ours.params, theirs.parameters))
    contract = theirs.contract
    assert BASE_POLICIES[ours.base] == contract.base.value
    assert (ours.min_models, ours.max_models) == (contract.min_inputs, contract.max_inputs)
    assert ours.random == (name == "arcee_fusion")


def test_only_multislerp_searches_per_model_weights():
    assert [name for name, spec in SPECS.items() if spec.searchable] == ["multislerp"]
    weight = multislerp.SPEC.param("weight")
    assert weight is WEIGHT  # the one per-model weight gene every searchable method shares
    assert (weight.scope, weight.search, weight.alone, weight.uniform) == ("model", (0.0, 1.0), "one_hot", "share")
    assert multislerp.SPEC.genes("model") == ("weight",) and multislerp.SPEC.genes("global") == ()
    for spec in SPECS.values():  # ram's epsilon is no gene: della's per-model epsilon gene means another thing
        assert spec is multislerp.SPEC or all(p.search is None for p in spec.params)


def test_all_seven_register_in_mergekit_order(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", {})
    for spec in SPECS.values():
        registry.register(spec)
    assert list(registry.METHODS) == [m.spec.name for m in mk_methods.registered_methods() if m.spec.name in SPECS]
    assert registry.searchable_methods() == {"multislerp": multislerp.SPEC}
    assert registry.get_method("karcher") is SPECS["karcher"]


# -- nearswap: bit for bit ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.5, 2.0, -1.0])
def test_nearswap_bit_exact(dtype, shape, t):
    a, b = random_inputs(2, shape, dtype)
    b = torch.where(torch.arange(b.numel()).reshape(shape) % 3 == 0, a, b)  # some zero gaps
    for base_index in (0, 1):
        ours = evomerge_merge("nearswap", [a, b], options={"t": t}, base_index=base_index)
        assert_same(ours, mergekit_merge("nearswap", [a, b], options={"t": t}, base_index=base_index), dtype)
        if t <= 0:
            assert torch.equal(ours, [a, b][base_index])


def test_nearswap_swaps_entries_within_t():
    base, other = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.1, 0.4, 2.0])
    ours = evomerge_merge("nearswap", [base, other], options={"t": 0.2}, base_index=0)
    torch.testing.assert_close(ours, torch.tensor([0.1, 0.2, 0.2]))  # weight 1, 0.5, 0.1


# -- ram / ramplus_tl: bit for bit -------------------------------------------------------------------
RAMPLUS_OPTIONS = [{}, {"r": 0.7, "alpha": 3.0}, {"r": -0.2, "alpha": 0.05, "epsilon": 0.3}]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 5])
def test_ram_bit_exact(dtype, shape, count):
    tensors = sparse_task_vectors(count, shape, dtype)
    for options in ({}, {"epsilon": 0.3}, {"epsilon": 0.0}):
        for base_index in (0, count - 1):
            ours = evomerge_merge("ram", tensors, options=options, base_index=base_index)
            assert_same(ours, mergekit_merge("ram", tensors, options=options, base_index=base_index), dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("options", RAMPLUS_OPTIONS, ids=["defaults", "r-alpha", "negative-r-epsilon"])
def test_ramplus_tl_bit_exact(dtype, shape, count, options):
    tensors = sparse_task_vectors(count, shape, dtype, keep=0.7)
    ours = evomerge_merge("ramplus_tl", tensors, options=options, base_index=0)
    theirs = mergekit_merge("ramplus_tl", tensors, options=options, base_index=0)
    assert theirs.dtype == F32  # mergekit: the float32 boost promotes bf16 results
    assert_same(ours, theirs, dtype)


def test_ram_sums_unique_and_averages_shared_entries():
    base = torch.zeros(4)
    first, second = torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([3.0, 0.0, 5.0, 0.0])
    merged = evomerge_merge("ram", [base, first, second], base_index=0)
    assert torch.equal(merged, torch.tensor([2.0, 2.0, 5.0, 0.0]))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl", "sce"])
def test_lone_base_is_returned_unchanged(name):
    (base,) = random_inputs(1, (5, 6), BF16)
    ours = evomerge_merge(name, [base], base_index=0)
    assert_same(ours, mergekit_merge(name, [base], base_index=0), BF16)
    assert torch.equal(ours, base) and ours.data_ptr() != base.data_ptr()


# -- sce: bf16 bit for bit, float32 to 1e-6 -------------------------------------------------------------
SCE_OPTIONS = [
    {},
    {"select_topk": 0.3},
    {"select_topk": 0.01},
    {"select_topk": 0.0},
    {"select_topk": -0.5},
    {"select_topk": 1.5},
    {"select_topk": 0.5, "int8_mask": True},
]
SCE_IDS = ["defaults", "topk-0.3", "topk-0.01", "topk-0", "topk-negative", "topk-above-1", "topk-int8"]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("options", SCE_OPTIONS, ids=SCE_IDS)
def test_sce_matches(dtype, shape, count, options):
    tensors = random_inputs(count, shape, dtype, seed=count)
    ours = evomerge_merge("sce", tensors, options=options, base_index=0)
    theirs = mergekit_merge("sce", tensors, options=options, base_index=0)
    if dtype == BF16:
        assert_same(ours, theirs, dtype)
    else:  # the mean squares are float32 sums in mergekit, float64 ones here
        assert_float32_close(ours, theirs, rtol=1e-6)


def test_sce_selection_keeps_the_top_variance_entries_and_ignores_int8_mask():
    base = torch.zeros(6)
    first = torch.tensor([1.0, 0.1, 3.0, 0.0, 0.2, 1.0])
    second = torch.tensor([-1.0, 0.1, 1.0, 0.0, 0.1, 1.0])
    # Variances 1, 0, 1, 0, 0.0025, 0: 3 nonzero, int(3 * 0.7) = 2 kept (entries 0 and 2).
    kept = sce.selection_mask(torch.stack([first, second]), 0.7)
    assert kept.tolist() == [True, False, True, False, False, False]
    plain = evomerge_merge("sce", [base, first, second], options={"select_topk": 0.7}, base_index=0)
    int8 = evomerge_merge("sce", [base, first, second], options={"select_topk": 0.7, "int8_mask": True}, base_index=0)
    assert torch.equal(plain, int8)
    assert plain[[1, 3, 4, 5]].eq(0).all() and plain[0] != 0


def test_sce_zero_task_vectors_weigh_uniformly():
    base, other = random_inputs(2, (7, 3), F32)
    tensors = [base, base.clone(), other]
    assert_float32_close(
        evomerge_merge("sce", tensors, base_index=0), mergekit_merge("sce", tensors, base_index=0), rtol=1e-6
    )
    same = evomerge_merge("sce", [base, base.clone(), base.clone()], base_index=0)
    assert torch.equal(same, base)


# -- multislerp: bf16 bit for bit, float32 to 1e-6 -------------------------------------------------------
def multislerp_params(count, base_index, weights=(0.2, 0.5, 0.3, 0.9, 0.1)):
    return [{} if index == base_index else {"weight": weights[index]} for index in range(count)]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("base_index", [None, 0])
@pytest.mark.parametrize("options", [{}, {"normalize_weights": False}, {"eps": 1e-3}], ids=["defaults", "raw", "eps"])
def test_multislerp_matches(dtype, shape, count, base_index, options):
    tensors = random_inputs(count, shape, dtype, seed=count)
    params = multislerp_params(count, base_index)
    ours = evomerge_merge("multislerp", tensors, params, options, base_index)
    theirs = mergekit_merge("multislerp", tensors, params, options, base_index)
    if dtype == BF16:
        assert_same(ours, theirs, dtype)
    else:  # norms and cosines: float32 sums in mergekit, float64 ones here
        assert_float32_close(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("base_index", [None, 1])
def test_multislerp_one_model_besides_the_base_is_that_model(dtype, base_index):
    tensors = random_inputs(2 if base_index is not None else 1, (9, 4), dtype)
    params = multislerp_params(len(tensors), base_index)
    ours = evomerge_merge("multislerp", tensors, params, {}, base_index)
    assert_same(ours, mergekit_merge("multislerp", tensors, params, {}, base_index), dtype)
    assert torch.equal(ours, tensors[0]) and ours.data_ptr() != tensors[0].data_ptr()


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("base_index", [None, 0])
def test_multislerp_cancelling_directions(dtype, base_index):
    # Opposite models with equal weights: a zero mean direction. Two models fall back to lerp...
    # Sixteenths of size < 8: every sum and difference below is exact, so the deltas cancel exactly.
    base, point = ((t * 16).round().clamp(-60, 60) / 16 for t in random_inputs(2, (6, 5), dtype))
    offset = base if base_index is not None else torch.zeros_like(base)
    pair = [offset + point, offset - point]
    tensors = ([base] if base_index is not None else []) + pair
    params = multislerp_params(len(tensors), base_index, weights=(0.5, 0.5, 0.5))
    ours = evomerge_merge("multislerp", tensors, params, {}, base_index)
    assert_same(ours, mergekit_merge("multislerp", tensors, params, {}, base_index), dtype)
    assert torch.equal(ours, offset)  # the lerp midpoint of +point and -point
    # ... more than two are refused, as in mergekit (a third model of weight 0 changes nothing).
    triple = tensors + [offset + 2 * point]
    params = [{} if index == base_index else {"weight": 0.5} for index in range(len(triple))]
    params[-1]["weight"] = 0.0
    for merge in (evomerge_merge, mergekit_merge):
        with pytest.raises(ValueError, match="zero"):
            merge("multislerp", triple, params, {}, base_index)


def test_multislerp_weights_summing_to_zero_stay_finite():
    # Deliberate difference (as linear's): mergekit divides the weights by their ~0 sum.
    tensors = random_inputs(2, (6, 5), F32)
    params = [{"weight": 0.5}, {"weight": -0.5}]
    assert not torch.isfinite(mergekit_merge("multislerp", tensors, params)).all()
    ours = evomerge_merge("multislerp", tensors, params)
    assert torch.isfinite(ours).all()
    raw = evomerge_merge("multislerp", tensors, params, {"normalize_weights": False})
    assert torch.equal(ours, raw)
    assert_float32_close(ours, mergekit_merge("multislerp", tensors, params, {"normalize_weights": False}), 1e-6)


# -- karcher: float32 to 1e-5, bf16 within bf16 rounding ---------------------------------------------------
KARCHER_OPTIONS = [{}, {"max_iter": 3, "tol": 1e-3}, {"max_iter": 0}, {"max_iter": 50, "tol": 1e-9}]
KARCHER_IDS = ["defaults", "3-steps", "no-steps", "tight"]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("options", KARCHER_OPTIONS, ids=KARCHER_IDS)
def test_karcher_matches(dtype, shape, count, options):
    tensors = random_inputs(count, shape, dtype, seed=count)
    for base_index in (None, 0):  # a listed base is one more input
        ours = evomerge_merge("karcher", tensors, options=options, base_index=base_index)
        theirs = mergekit_merge("karcher", tensors, options=options, base_index=base_index)
        if dtype == F32:
            assert_float32_close(ours, theirs, rtol=1e-5)
        else:
            reference = mergekit_merge("karcher", [t.double() for t in tensors], options=options)
            assert_bf16_agrees(ours, theirs, reference)


def give_mergekit_karcher_our_scalars(monkeypatch) -> None:
    """mergekit's karcher module sees a `torch` whose vector_norm and dot are our float64 sums,
    rounded to the input's dtype; every other op (and their order, the stopping tests) is its own."""

    class OurScalars(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    scalars = OurScalars("torch")
    scalars.dot = lambda a, b: dot64(a, b).to(a.dtype)
    scalars.linalg = types.SimpleNamespace(vector_norm=lambda tensor: norm64(tensor).to(tensor.dtype))
    monkeypatch.setattr(mk_karcher, "torch", scalars)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("options", KARCHER_OPTIONS, ids=KARCHER_IDS)
def test_karcher_bit_for_bit_given_our_scalars(dtype, options, monkeypatch):
    """Our karcher is mergekit's, op for op and dtype for dtype; only its norms and dots are summed
    in float64 (then rounded to the dtype mergekit holds them in). Given those, every bit agrees."""
    give_mergekit_karcher_our_scalars(monkeypatch)
    for count in (2, 3, 5):
        tensors = random_inputs(count, (24, 40), dtype, seed=count)
        for base_index in (None, 0):
            ours = evomerge_merge("karcher", tensors, options=options, base_index=base_index)
            assert_same(ours, mergekit_merge("karcher", tensors, options=options, base_index=base_index), dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_karcher_zero_norm_tensors(dtype):
    first, second = random_inputs(2, (8, 6), dtype)
    zero = torch.zeros_like(first)
    for tensors in ([first, zero], [first, second, zero], [zero, zero], [zero, first * 1e-7, zero]):
        ours = evomerge_merge("karcher", tensors)
        theirs = mergekit_merge("karcher", tensors)
        assert ours.dtype == dtype
        # A zero tensor has no direction, and counts as norm 0 in the mean norm.
        torch.testing.assert_close(ours, theirs, rtol=1e-6 if dtype == F32 else 2**-7, atol=0)
    assert torch.equal(evomerge_merge("karcher", [zero, zero]), zero)
    torch.testing.assert_close(evomerge_merge("karcher", [first.float(), zero.float()]), first.float() / 2)


def test_karcher_single_tensor_is_a_copy():
    (only,) = random_inputs(1, (4, 4), BF16)
    ours = evomerge_merge("karcher", [only])
    assert torch.equal(ours, only) and ours.data_ptr() != only.data_ptr()


# -- the float64 reductions on large, fine-tune-like tensors ----------------------------------------------
def finetune_family(count, shape, dtype, seed=0):
    """A base and count-1 models that differ from it by small noise, as fine-tunes do."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    finetunes = [base + 0.02 * torch.randn(shape, generator=generator) for _ in range(count - 1)]
    return [tensor.to(dtype) for tensor in [base, *finetunes]]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("name,base_index", [("karcher", None), ("multislerp", None), ("multislerp", 0), ("sce", 0)])
def test_large_tensors_float64_sums_stay_closer_to_exact_math(dtype, name, base_index):
    tensors = finetune_family(4, (512, 1024), dtype)
    params = multislerp_params(4, base_index) if name == "multislerp" else None
    ours = evomerge_merge(name, tensors, params, {}, base_index)
    theirs = mergekit_merge(name, tensors, params, {}, base_index)
    reference = mergekit_merge(name, [t.double() for t in tensors], params, {}, base_index)
    if dtype == F32:
        # mergekit's float32 norms drift with the size (multislerp: ~1e-5 relative at 512K entries);
        # ours, summed in float64, stay within float32 rounding of the exact math.
        ours_error = (ours.double() - reference).abs().max().item()
        theirs_error = (theirs.double() - reference).abs().max().item()
        assert ours_error <= 1e-6 * reference.abs().max().item()
        assert ours_error <= theirs_error + 1e-7
    elif name == "karcher":
        assert_bf16_agrees(ours, theirs, reference)
    else:
        assert_same(ours, theirs, dtype)


# -- arcee_fusion: bit for bit, given the same sample ----------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("shape", [*SHAPES, (1,), (2, 3, 5)])
def test_arcee_fusion_bit_exact(dtype, shape):
    tensors = random_inputs(2, shape, dtype)
    for base_index in (0, 1):
        ours = evomerge_merge("arcee_fusion", tensors, base_index=base_index)
        theirs = mergekit_merge("arcee_fusion", tensors, base_index=base_index)
        assert theirs.dtype == F32  # mergekit: its float32 mask promotes bf16 results
        assert_same(ours, theirs, dtype)


class OurSample:
    """Stands in for torch.randint inside mergekit's arcee_fusion: draws the indices we draw."""

    def __init__(self, seed):
        self.seed, self.calls = seed, 0
        self.randint = torch.randint

    def __call__(self, high, size, *, device=None):
        self.calls += 1
        return self.randint(high, size, generator=make_generator(self.seed, 0, "cpu")).to(device)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("sample_size", [50, 1_000_000], ids=["patched-50", "mergekit-size"])
def test_arcee_fusion_sampled_quartiles_bit_exact_given_our_sample(monkeypatch, dtype, sample_size):
    shape = (40, 56) if sample_size == 50 else (1001, 1000)
    monkeypatch.setattr(arcee_fusion, "SAMPLE_SIZE", sample_size)
    monkeypatch.setattr(mk_arcee_fusion, "_QUANTILE_SAMPLE_SIZE", sample_size)
    tensors = random_inputs(2, shape, dtype, seed=5)
    ours = evomerge_merge("arcee_fusion", tensors, base_index=0, seed=7)
    sample = OurSample(7)
    monkeypatch.setattr(torch, "randint", sample)
    theirs = mergekit_merge("arcee_fusion", tensors, base_index=0)
    assert sample.calls == 1
    assert_same(ours, theirs, dtype)
    assert 0 < int((ours != tensors[0]).sum()) < ours.numel()


def test_arcee_fusion_sample_is_reproducible_from_the_seed(monkeypatch):
    monkeypatch.setattr(arcee_fusion, "SAMPLE_SIZE", 100)
    scores = torch.rand(5000, generator=torch.Generator().manual_seed(0))
    global_state = torch.get_rng_state()
    first = arcee_fusion.quantile_sample(scores, 11)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is not touched
    assert first.numel() == 100
    assert torch.equal(arcee_fusion.quantile_sample(scores, 11), first)
    assert not torch.equal(arcee_fusion.quantile_sample(scores, 12), first)
    tensors = random_inputs(2, (50, 100), F32, seed=1)
    merged = [evomerge_merge("arcee_fusion", tensors, base_index=0, seed=seed) for seed in (11, 11, 12)]
    assert torch.equal(merged[0], merged[1])
    small = random_inputs(2, (5, 20), F32)  # 100 entries: no sample, the seed does not matter
    assert torch.equal(
        evomerge_merge("arcee_fusion", small, base_index=0, seed=1),
        evomerge_merge("arcee_fusion", small, base_index=0, seed=2),
    )


# -- float64 inputs, inputs untouched --------------------------------------------------------------------
FLOAT64_CASES = [
    ("nearswap", 2, 0, {"t": 0.3}),
    ("ram", 4, 0, {}),
    ("ramplus_tl", 4, 1, {"r": 0.5}),
    ("sce", 4, 0, {"select_topk": 0.4}),
    ("multislerp", 4, 0, {}),
    ("multislerp", 3, None, {}),
    ("karcher", 3, None, {}),
    ("arcee_fusion", 2, 1, {}),
]


@pytest.mark.parametrize("name,count,base_index,options", FLOAT64_CASES, ids=[c[0] for c in FLOAT64_CASES])
def test_float64_inputs_match_and_inputs_are_untouched(name, count, base_index, options):
    tensors = sparse_task_vectors(count, (16, 24), torch.float64)
    before = [tensor.clone() for tensor in tensors]
    params = multislerp_params(count, base_index) if name == "multislerp" else None
    ours = evomerge_merge(name, tensors, params, options, base_index)
    theirs = mergekit_merge(name, tensors, params, options, base_index)
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))


def test_mixed_dtypes_are_cast_to_the_base_dtype_first():
    # merge_tensors' rule for every method (mergekit-yaml likewise casts every input to `dtype`).
    base, other = random_inputs(2, (6, 7), F32)
    ours = evomerge_merge("nearswap", [base.to(BF16), other], options={"t": 0.5}, base_index=0)
    theirs = mergekit_merge("nearswap", [base.to(BF16), other.to(BF16)], options={"t": 0.5}, base_index=0)
    assert_same(ours, theirs, BF16)


OUT_CASES = [
    ("multislerp", 3, None, {}), ("multislerp", 3, 0, {}), ("nearswap", 2, 1, {"t": 0.3}), ("ram", 3, 0, {}),
    ("ramplus_tl", 3, 0, {}), ("sce", 3, 0, {"select_topk": 0.5}), ("arcee_fusion", 2, 0, {}), ("karcher", 3, None, {}),
]  # fmt: skip


@pytest.mark.parametrize("name,count,base_index,options", OUT_CASES, ids=[f"{c[0]}-{c[2]}" for c in OUT_CASES])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_out_receives_the_result_and_plans_check_the_same(name, count, base_index, options, dtype):
    tensors = sparse_task_vectors(count, (12, 10), dtype)
    params = multislerp_params(count, base_index) if name == "multislerp" else None
    merged = evomerge_merge(name, tensors, params, options, base_index, seed=3)
    assert merged.dtype == dtype and all(merged.data_ptr() != t.data_ptr() for t in tensors)
    out = torch.full_like(tensors[0], float("nan"))
    assert evomerge_merge(name, tensors, params, options, base_index, seed=3, out=out) is out
    assert torch.equal(out, merged)
    check_parameters(name, params or [{} for _ in tensors], options, base_index)  # what the planner runs


# -- the errors merge_tensors and the planner raise -------------------------------------------------------
def _two(dtype=F32):
    return random_inputs(2, (4,), dtype)


ERROR_CASES = [
    ("nearswap", lambda: (random_inputs(3, (4,), F32), None, {"t": 0.1}, 0), "a base and one other"),
    ("nearswap", lambda: (_two(), None, {}, 0), "needs global parameter 't'"),
    ("nearswap", lambda: (_two(), None, {"t": 0.1}, None), "needs a base model"),
    ("arcee_fusion", lambda: (random_inputs(1, (4,), F32), None, {}, 0), "a base and one other"),
    ("arcee_fusion", lambda: (random_inputs(3, (4,), F32), None, {}, 0), "a base and one other"),
    ("multislerp", lambda: (_two(), [{}, {"weight": 1.0}], {}, None), "needs parameter 'weight' for model 0"),
    ("multislerp", lambda: (random_inputs(1, (4,), F32), [{}], {}, 0),
     r"^multislerp needs at least one model besides the base, got only the base$"),
    ("karcher", lambda: (_two(), None, {"max_iter": 2.5}, None),
     r"^karcher: parameter 'max_iter' must be a whole number, got 2.5$"),
    ("karcher", lambda: (_two(), None, {"iterations": 2}, None), "no global parameter 'iterations'"),
    ("ram", lambda: (_two(), None, {}, None), "needs a base model"),
    ("ramplus_tl", lambda: (_two(), None, {"lambda": 1.0}, 0), "no global parameter 'lambda'"),
    ("sce", lambda: (_two(), None, {}, None), "needs a base model"),
]  # fmt: skip


@pytest.mark.parametrize("name,inputs,message", ERROR_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ERROR_CASES)])
def test_spec_driven_errors(name, inputs, message):
    tensors, params, options, base_index = inputs()
    with pytest.raises(ValueError, match=message):
        evomerge_merge(name, tensors, params, options, base_index)


@pytest.mark.parametrize("name,model_params,options,base_index,message", [
    ("multislerp", [{}], {}, 0, r"^multislerp needs at least one model besides the base, got only the base$"),
    ("karcher", [{}, {}], {"max_iter": 2.5}, None, r"^karcher: parameter 'max_iter' must be a whole number, got 2.5$"),
])  # fmt: skip
def test_check_parameters_refuses_what_a_merge_would(name, model_params, options, base_index, message):
    with pytest.raises(ValueError, match=message):
        check_parameters(name, model_params, options, base_index)
