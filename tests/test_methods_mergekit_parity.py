"""Parity with mergekit's own implementation of every method we support.

mergekit is called through its public in-memory API (`mergekit.merge_methods.merge_tensors`,
which runs the same kernels as `mergekit-yaml`) and its `mergekit.sparsify` functions.
Tolerances by dtype: task-vector methods, linear and passthrough must match bit for bit;
slerp/nuslerp/model_stock, whose scalar factors we compute in float64, to ~1e-6 in float32 and
within bf16 rounding in bf16. Random methods are compared at density 1 exactly, and below 1
by making mergekit draw our masks (torch.bernoulli patched), so everything but the random
draw itself is checked; the draw is checked statistically in test_methods.py.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("mergekit")

from mergekit import sparsify as mk_sparsify  # noqa: E402
from mergekit.merge_methods import merge_tensors as mk_merge_tensors  # noqa: E402

from evomerge.merge import blocks, native, sparsify, trim  # noqa: E402
from evomerge.merge.methods import METHODS, merge_tensors  # noqa: E402

BF16 = torch.bfloat16


@pytest.fixture(autouse=True, params=["whole", "blocks of 97", "native"])
def block_size(request, monkeypatch):
    """Every comparison three times. Eager torch kernels: each tensor in one block with TIES cuts
    by kthvalue, and cut into many odd-sized blocks with TIES cuts by radix histograms (blocked
    evaluation, per-block tie counting and chunked masks must not change a bit). Then the fused C
    kernel for the task-vector methods (native.py), with its histogram cuts and exact re-do of
    the entries inside a cut's bucket."""
    native.reset()
    if request.param == "native":
        monkeypatch.setenv("EVOMERGE_NATIVE", "1")
        if native.library() is None:
            pytest.skip("no C compiler here: the fused kernel cannot be built")
    else:
        monkeypatch.setenv("EVOMERGE_NATIVE", "0")
    if request.param == "blocks of 97":
        monkeypatch.setattr(blocks, "CPU_BLOCK", 97)
        monkeypatch.setattr(trim, "RADIX_MIN", 0)
    yield request.param
    native.reset()


def mergekit_merge(method, tensors, model_params, global_params, base_index):
    """The same merge through mergekit: per-model params keyed by input index, defaults filled."""
    spec = METHODS[method]
    base_index = None if spec.base == "unused" else base_index
    parameters = dict(global_params)
    for name, default in spec.model_params.items():
        values = {i: p.get(name, default) for i, p in enumerate(model_params) if i != base_index}
        parameters[name] = values
    return mk_merge_tensors(list(tensors), method, parameters=parameters, base_index=base_index)


def random_inputs(count, shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(count)]


def distinct_bf16_inputs(count, shape, seed=0):
    """bf16 base + deltas whose magnitudes are all distinct and whose sums are exact in bf16.

    Values are k/256 with |k| <= 256, so every sum below is exact, deltas are exactly the drawn
    values and no magnitude ties make the choice of kept entries implementation-defined.
    """
    numel = math.prod(shape)
    assert numel <= 240
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(-16, 17, shape, generator=generator).float() / 256
    tensors = [base]
    for _ in range(count - 1):
        magnitudes = (torch.randperm(240, generator=generator)[:numel] + 1).float()
        signs = torch.randint(0, 2, (numel,), generator=generator).float() * 2 - 1
        tensors.append(base + (magnitudes * signs).reshape(shape) / 256)
    return [t.to(BF16) for t in tensors]


class _StableSorts:
    """torch as mergekit.sparsify sees it, with argsort and sort made stable.

    mergekit picks the top-k by an unstable argsort, so among equal magnitudes at the cut it keeps
    an implementation-defined subset; we keep them as a stable sort would (see sparsify.py). With
    its sorts made stable, mergekit must then agree with us bit for bit: the tie order is the one
    and only difference.
    """

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def argsort(*args, **kwargs):
        return torch.argsort(*args, **{**kwargs, "stable": True})

    @staticmethod
    def sort(*args, **kwargs):
        return torch.sort(*args, **{**kwargs, "stable": True})


@pytest.fixture
def stable_mergekit_sorts(monkeypatch):
    monkeypatch.setattr(mk_sparsify, "torch", _StableSorts())


def has_magnitude_ties(tensors, base_index=0):
    for index, tensor in enumerate(tensors):
        if index != base_index:
            magnitude = (tensor - tensors[base_index]).abs().reshape(-1)
            if magnitude.unique().numel() != magnitude.numel():
                return True
    return False


def tie_free_inputs(count, shape, seed=0):
    """float32 inputs whose deltas have distinct magnitudes (the first such seed from `seed`),
    so which entries a sparsifier keeps is fully specified and results can match bit for bit."""
    while has_magnitude_ties(tensors := random_inputs(count, shape, torch.float32, seed)):
        seed += 1
    return tensors


def with_weights(weights, **per_model):
    params = [{}]
    for index, weight in enumerate(weights):
        entry = {"weight": weight}
        for name, values in per_model.items():
            entry[name] = values[index]
        params.append(entry)
    return params


# -- deterministic task-vector methods: bit-exact ----------------------------------------------------
GTA_CASES = [
    ("task_arithmetic", {}, with_weights([0.5, 0.3, 0.9])),
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}, with_weights([0.5, -0.3, 0.9])),
    ("task_arithmetic", {"normalize": True}, with_weights([0.5, -0.5, 0.0])),  # zero sum -> divisor 1
    ("ties", {}, with_weights([0.5, 0.3, 0.9], density=[0.2, 0.5, 0.9])),
    ("ties", {"normalize": False, "int8_mask": True}, with_weights([1.0, -0.6, 0.4], density=[0.3, 0.7, 1.0])),
    ("ties", {"rescale": True, "lambda": 1.5}, with_weights([0.5, 0.3, 0.9], density=[0.25, 0.5, 0.75])),
    ("breadcrumbs", {}, with_weights([0.5, 0.3, 0.9], density=[0.5, 0.9, 0.3], gamma=[0.05, 0.2, 0.01])),
    ("breadcrumbs", {"rescale": True}, with_weights([0.5, 0.3, 0.9], density=[0.5, 0.6, 0.7], gamma=[0.1, 0, 0.3])),
    ("breadcrumbs_ties", {}, with_weights([0.5, 0.3, 0.9], density=[0.5, 0.9, 0.3], gamma=[0.05, 0.2, 0.01])),
    ("breadcrumbs_ties", {"normalize": True}, with_weights([0.5, -0.3, 0.9], density=[0.4, 0.8, 0.6], gamma=[0.1] * 3)),
]
GTA_IDS = [f"{c[0]}-{i}" for i, c in enumerate(GTA_CASES)]


def assert_bf16_agrees(ours, theirs, reference):
    """bf16 where mergekit rounds an intermediate scalar (a cosine, a norm ratio) to bf16 and we
    keep it in float64: the two bf16 results differ by a bf16 step here and there. The reference
    is mergekit's own math on the same inputs in float64: ours must be within two bf16 steps (at
    the largest magnitude) of it, and no further from it than mergekit's bf16 result (give or
    take half a step)."""
    assert ours.dtype == theirs.dtype == BF16
    step = 2.0 ** (math.floor(math.log2(reference.abs().max().item())) - 7)
    ours_error = (ours.double() - reference).abs().max().item()
    theirs_error = (theirs.double() - reference).abs().max().item()
    assert ours_error <= 2 * step
    assert ours_error <= theirs_error + step / 2


@pytest.mark.parametrize("shape", [(40, 56), (97,)])
@pytest.mark.parametrize("method,options,params", GTA_CASES, ids=GTA_IDS)
def test_task_vector_methods_fp32(method, options, params, shape):
    tensors = tie_free_inputs(4, shape)
    ours = merge_tensors(method, tensors, params, options, 0)
    theirs = mergekit_merge(method, tensors, params, options, 0)
    if options.get("rescale"):  # L1 ratio: float32 in mergekit, float64 here
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max().item())
    else:
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", [(12, 20), (97,)])
@pytest.mark.parametrize("method,options,params", GTA_CASES, ids=GTA_IDS)
def test_task_vector_methods_bf16(method, options, params, shape):
    tensors = distinct_bf16_inputs(4, shape)
    ours = merge_tensors(method, tensors, params, options, 0)
    theirs = mergekit_merge(method, tensors, params, options, 0)
    if options.get("rescale"):  # L1 ratio: bf16 in mergekit, float64 here
        reference = mergekit_merge(method, [t.double() for t in tensors], params, options, 0)
        assert_bf16_agrees(ours, theirs, reference)
    else:
        assert ours.dtype == theirs.dtype == BF16
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("method,options,params", GTA_CASES, ids=GTA_IDS)
def test_task_vector_methods_bf16_random_inputs_with_magnitude_ties(method, options, params, stable_mergekit_sorts):
    # Real bf16 deltas share magnitudes all the time; with mergekit's sorts made stable even the
    # choice among equal magnitudes at the edge of the kept band is the same.
    tensors = random_inputs(4, (40, 56), BF16, seed=3)
    assert has_magnitude_ties(tensors)
    ours = merge_tensors(method, tensors, params, options, 0)
    theirs = mergekit_merge(method, tensors, params, options, 0)
    if options.get("rescale"):  # same kept entries; only the L1 ratio's rounding differs
        step = 2.0 ** (math.floor(math.log2(theirs.abs().max().item())) - 7)
        assert (ours.double() - theirs.double()).abs().max().item() <= 2 * step
    else:
        assert torch.equal(ours, theirs)


# -- sparsifiers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("numel", [1, 3, 10, 99, 1000])
@pytest.mark.parametrize("density", [0.05, 0.1, 0.34, 0.5, 0.99, 1.0, 0.0])
def test_magnitude_sparsifier_matches(numel, density):
    delta = random_inputs(1, (numel,), torch.float32, seed=numel)[0]
    theirs = mk_sparsify.magnitude(delta, density)
    ours = sparsify.magnitude(delta, density)
    assert torch.equal(ours, theirs)  # k == 0 included: both keep the single largest entry
    rescaled = mk_sparsify.magnitude(delta, density, rescale_norm=mk_sparsify.RescaleNorm.l1)
    if density > 0:
        torch.testing.assert_close(sparsify.magnitude(delta, density, rescale=True), rescaled, rtol=1e-6, atol=0)


@pytest.mark.parametrize("numel", [1, 7, 10, 99, 1000])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.3, 0.0), (0.9, 0.2), (0.5, 0.1), (0.2, 0.5), (0.0, 0.1)])
def test_breadcrumbs_sparsifier_matches(numel, density, gamma):
    # Includes int(gamma * numel) == 0 (difference 1 vs mergekit 0.1.4): 0.1.5 agrees with us.
    delta = random_inputs(1, (numel,), torch.float32, seed=numel)[0]
    theirs = mk_sparsify.magnitude_outliers(delta, density, gamma=gamma)
    assert torch.equal(sparsify.breadcrumbs(delta, density, gamma), theirs)


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_sparsifiers_choose_equal_magnitudes_as_a_stable_sort(dtype, stable_mergekit_sorts):
    delta = random_inputs(1, (64, 64), dtype, seed=5)[0]
    assert delta.abs().unique().numel() < delta.numel()  # there are ties
    for density in (0.1, 0.5, 0.8):
        assert torch.equal(sparsify.magnitude(delta, density), mk_sparsify.magnitude(delta, density))
        for gamma in (0.0, 0.05):
            theirs = mk_sparsify.magnitude_outliers(delta, density, gamma=gamma)
            assert torch.equal(sparsify.breadcrumbs(delta, density, gamma), theirs)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.8])
def test_with_mergekit_unstable_sort_only_tied_magnitudes_at_the_cut_differ(density):
    delta = random_inputs(1, (256, 384), BF16, seed=3)[0]
    ours, theirs = sparsify.magnitude(delta, density) != 0, mk_sparsify.magnitude(delta, density) != 0
    k = int(density * delta.numel())
    assert int(ours.sum()) == int(theirs.sum()) == k
    cut = delta.float().abs().reshape(-1).kthvalue(delta.numel() - k + 1).values
    disagree = ours != theirs
    assert torch.all(delta.float().abs()[disagree] == cut)  # only entries tied with the k-th magnitude swap


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_l1_rescale_of_a_given_mask_matches(dtype):
    delta = random_inputs(1, (50, 70), dtype, seed=2)[0]
    mask = (torch.rand(delta.shape, generator=torch.Generator().manual_seed(1)) < 0.3).to(dtype)
    theirs = mk_sparsify.rescaled_masked_tensor(delta, mask, mk_sparsify.RescaleNorm.l1)
    ours = sparsify.apply_mask(delta, mask.bool(), rescale=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-6 if dtype == torch.float32 else 2**-7, atol=0)
    assert torch.equal(sparsify.apply_mask(delta, mask.bool(), rescale=False), delta * mask)


# -- random methods ----------------------------------------------------------------------------------
RANDOM_METHODS = ["dare_linear", "dare_ties", "della", "della_linear"]


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_methods_at_density_one_bit_exact(method, dtype):
    tensors = random_inputs(4, (30, 40), dtype)
    params = with_weights([0.5, -0.3, 0.9])
    for options in ({}, {"normalize": True, "lambda": 1.2}):
        ours = merge_tensors(method, tensors, params, options, 0, seed=4)
        assert torch.equal(ours, mergekit_merge(method, tensors, params, options, 0))


class InjectedDraws:
    """Stands in for torch.bernoulli inside mergekit: draws the masks our seeded generators draw.

    mergekit calls torch.bernoulli(probabilities) once per sparsified model, in model order.
    """

    def __init__(self, seed, model_indices):
        self.seed, self.pending, self.probabilities = seed, list(model_indices), []

    def __call__(self, probabilities, *args, **kwargs):
        index = self.pending.pop(0)
        generator = sparsify.make_generator(self.seed, index, probabilities.device)
        uniform = torch.rand(probabilities.numel(), generator=generator, dtype=torch.float32)
        self.probabilities.append(probabilities)
        return (uniform.reshape(probabilities.shape) < probabilities.float()).to(probabilities.dtype)


RANDOM_CASES = [
    ("dare_linear", {}, with_weights([0.5, 0.3, 0.9], density=[0.25, 0.5, 0.75])),
    ("dare_linear", {"rescale": False, "normalize": True}, with_weights([0.5, -0.3, 0.9], density=[0.5, 0.5, 1.0])),
    ("dare_ties", {}, with_weights([0.5, 0.3, 0.9], density=[0.25, 0.5, 0.75])),
    ("dare_ties", {"normalize": True, "lambda": 0.8}, with_weights([1.0, -0.6, 0.4], density=[0.375, 0.5, 0.125])),
    ("della", {}, with_weights([0.5, 0.3, 0.9], density=[0.3, 0.5, 0.7], epsilon=[0.1, 0.15, 0.2])),
    ("della_linear", {}, with_weights([0.5, -0.3, 0.9], density=[0.3, 0.5, 0.7], epsilon=[0.1, 0.15, 0.2])),
    ("della_linear", {"rescale": False}, with_weights([0.5, 0.3, 0.9], density=[0.4, 1.0, 0.6])),
]


@pytest.mark.parametrize("shape", [(30, 40), (101,), (4, 9, 6)])
@pytest.mark.parametrize("method,options,params", RANDOM_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RANDOM_CASES)])
def test_random_methods_given_the_same_masks_fp32(monkeypatch, method, options, params, shape):
    tensors = tie_free_inputs(4, shape, seed=7)
    seed = 1234
    ours = merge_tensors(method, tensors, params, options, 0, seed=seed)
    draws = InjectedDraws(seed, [i for i in range(1, 4) if params[i]["density"] < 1])
    monkeypatch.setattr(torch, "bernoulli", draws)
    theirs = mergekit_merge(method, tensors, params, options, 0)
    assert not draws.pending
    # The rescale factor is a float32 ratio in mergekit and a float64 one here.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    if method.startswith("della"):  # the keep probabilities themselves are identical
        sparsified = [i for i in range(1, 4) if params[i]["density"] < 1]
        for index, captured in zip(sparsified, draws.probabilities):
            expected = sparsify.della_probabilities(
                tensors[index] - tensors[0], params[index]["density"], params[index].get("epsilon", 0.15)
            )
            assert torch.equal(expected, captured.reshape(expected.shape))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_given_the_same_masks_bf16(monkeypatch, method):
    # Densities exact in bf16, so mergekit's bf16 probabilities equal ours.
    tensors = random_inputs(4, (30, 40), BF16, seed=8)
    params = with_weights([0.5, 0.3, 0.9], density=[0.25, 0.5, 0.75])
    ours = merge_tensors(method, tensors, params, {}, 0, seed=99)
    monkeypatch.setattr(torch, "bernoulli", InjectedDraws(99, [1, 2, 3]))
    theirs = mergekit_merge(method, tensors, params, {}, 0)
    monkeypatch.setattr(torch, "bernoulli", InjectedDraws(99, [1, 2, 3]))
    reference = mergekit_merge(method, [t.double() for t in tensors], params, {}, 0)
    # mergekit rounds the L1 norms and their ratio to bf16; we keep them in float64.
    assert_bf16_agrees(ours, theirs, reference)


def test_della_probabilities_bf16_within_bf16_rounding(monkeypatch):
    tensors = distinct_bf16_inputs(2, (12, 20))
    draws = InjectedDraws(0, [1])
    monkeypatch.setattr(torch, "bernoulli", draws)
    mergekit_merge("della", tensors, with_weights([1.0], density=[0.5], epsilon=[0.2]), {}, 0)
    expected = sparsify.della_probabilities(tensors[1] - tensors[0], 0.5, 0.2)
    torch.testing.assert_close(draws.probabilities[0].float(), expected, rtol=0, atol=2**-8)


# -- linear / passthrough: bit-exact ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("options", [{}, {"normalize": False}])
def test_linear_bit_exact(dtype, options):
    tensors = random_inputs(3, (40, 56), dtype)
    params = [{"weight": 0.2}, {"weight": 0.5}, {"weight": -0.1}]
    for base_index in (None, 1):  # a listed base is just another input
        ours = merge_tensors("linear", tensors, params, options, base_index)
        assert torch.equal(ours, mergekit_merge("linear", tensors, params, options, base_index))


def test_linear_zero_weight_sum_is_finite_difference_3():
    tensors = random_inputs(2, (8,), torch.float32)
    params = [{"weight": 1.0}, {"weight": -1.0}]
    theirs = mergekit_merge("linear", tensors, params, {}, None)
    assert not torch.isfinite(theirs).all()  # mergekit divides by zero
    assert torch.equal(merge_tensors("linear", tensors, params, {}, None), tensors[0] - tensors[1])


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("params", [{}, {"scale": 0.5}, {"scale": -3.0}])
def test_passthrough_bit_exact(dtype, params):
    tensors = random_inputs(1, (9, 11), dtype)
    ours = merge_tensors("passthrough", tensors, [params], {}, None)
    assert torch.equal(ours, mergekit_merge("passthrough", tensors, [params], {}, None))


# -- slerp / nuslerp / model_stock: within rounding ---------------------------------------------------
def slerp_pairs(dtype):
    a, b = random_inputs(2, (40, 56), dtype)
    noise = random_inputs(1, (40, 56), dtype, seed=1)[0]
    return {
        "random": (a, b),
        "vector": (a.reshape(-1)[:300], b.reshape(-1)[:300]),
        "near-parallel": (a, (a.float() + 1e-3 * noise.float()).to(dtype)),
        "anti-parallel": (a, (-2 * a.float()).to(dtype)),
        "zero-base": (torch.zeros_like(a), b),
    }


def assert_close_for(dtype, ours, theirs):
    if dtype == torch.float32:
        scale = max(1.0, theirs.abs().max().item())
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * scale)
    else:  # both round a float32 result to bf16: at most one bf16 step apart
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("pair", ["random", "vector", "near-parallel", "anti-parallel", "zero-base"])
def test_slerp_matches(dtype, pair):
    a, b = slerp_pairs(dtype)[pair]
    for t in (0.0, 0.25, 0.5, 1.0, 1.3, -0.2):
        for base_index in (0, 1):
            tensors = [a, b] if base_index == 0 else [b, a]
            ours = merge_tensors("slerp", tensors, [{}, {}], {"t": t}, base_index)
            theirs = mergekit_merge("slerp", tensors, [{}, {}], {"t": t}, base_index)
            assert ours.dtype == theirs.dtype == dtype
            assert_close_for(dtype, ours, theirs)
            if t == 0.0:
                assert torch.equal(ours, a) and torch.equal(theirs, a)


def bf16_agrees(ours, theirs, tensors, method, params, options, base_index):
    reference = mergekit_merge(method, [t.double() for t in tensors], params, options, base_index)
    assert_bf16_agrees(ours, theirs, reference)


NUSLERP_OPTIONS = [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}]


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("options", NUSLERP_OPTIONS, ids=["flat", "rows", "columns"])
@pytest.mark.parametrize("shape", [(24, 36), (6, 5, 7), (50,)])
def test_nuslerp_matches(dtype, options, shape):
    tensors = random_inputs(3, shape, dtype)
    for base_index, weights in ((0, [None, 0.3, 0.9]), (None, [0.3, 0.9, None]), (2, [1.0, -1.0, None])):
        count = 3 if base_index is not None else 2
        params = [{} if w is None else {"weight": w} for w in weights[:count]]
        inputs = tensors[:count]
        ours = merge_tensors("nuslerp", inputs, params, options, base_index)
        theirs = mergekit_merge("nuslerp", inputs, params, options, base_index)
        if dtype == torch.float32:
            assert_close_for(dtype, ours, theirs)
        else:
            bf16_agrees(ours, theirs, inputs, "nuslerp", params, options, base_index)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("options", [{}, {"filter_wise": True}], ids=["tensor", "filter_wise"])
@pytest.mark.parametrize("shape", [(24, 36), (6, 5, 7), (50,)])
@pytest.mark.parametrize("count", [3, 5])
def test_model_stock_matches(dtype, options, shape, count):
    base = random_inputs(1, shape, torch.float32, seed=11)[0]
    # Fine-tunes share a direction, so cosines (and t) are far from 0 as in real use.
    shared = random_inputs(1, shape, torch.float32, seed=12)[0]
    noise = random_inputs(count - 1, shape, torch.float32)
    tensors = [base.to(dtype)] + [(base + shared + 0.7 * n).to(dtype) for n in noise]
    params = [{}] * count
    ours = merge_tensors("model_stock", tensors, params, options, 0)
    theirs = mergekit_merge("model_stock", tensors, params, options, 0)
    if dtype == torch.float32:
        assert_close_for(dtype, ours, theirs)
    else:
        bf16_agrees(ours, theirs, tensors, "model_stock", params, options, 0)


def test_model_stock_opposed_deltas_keep_base_like_mergekit():
    base, delta = random_inputs(2, (10, 12), torch.float32)
    tensors = [base, base + delta, base - delta]
    for options in ({}, {"filter_wise": True}):
        ours = merge_tensors("model_stock", tensors, [{}] * 3, options, 0)
        theirs = mergekit_merge("model_stock", tensors, [{}] * 3, options, 0)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours, base, rtol=0, atol=1e-6)


# -- float64 inputs: everything in float64 on both sides ----------------------------------------------
FLOAT64_CASES = [
    ("linear", [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.4}], {}, None),
    ("slerp", [{}, {}], {"t": 0.35}, 1),
    ("nuslerp", [{}, {"weight": 0.4}, {"weight": 0.8}], {"nuslerp_flatten": False}, 0),
    ("model_stock", [{}, {}, {}, {}], {"filter_wise": True}, 0),
    ("passthrough", [{"scale": 1.5}], {}, None),
    *[(method, params, options, 0) for method, options, params in GTA_CASES],
]


@pytest.mark.parametrize("method,params,options,base_index", FLOAT64_CASES, ids=[c[0] for c in FLOAT64_CASES])
def test_float64_inputs_match(method, params, options, base_index):
    tensors = [t.double() for t in tie_free_inputs(len(params), (16, 24))]
    ours = merge_tensors(method, tensors, params, options, base_index)
    theirs = mergekit_merge(method, tensors, params, options, base_index)
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
