"""Merge-method math: hand-computed values on tiny tensors, invariants, determinism, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge import sparsify
from evomerge.merge.methods import METHODS, MethodSpec, get_method, merge_tensors

ALL_METHODS = [
    "linear",
    "slerp",
    "nuslerp",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "passthrough",
]
# mergekit 0.1.5's other seven, registered after those in its registry order.
NEW_METHODS = ["multislerp", "nearswap", "ram", "ramplus_tl", "sce", "arcee_fusion", "karcher"]
DATA_METHODS = ["fisher", "regmean"]  # evomerge's own (no mergekit counterpart): tests/test_data_methods.py
TASK_VECTOR_METHODS = [m for m in ALL_METHODS if METHODS[m].base == "required" and "density" in METHODS[m].model_params]
R2 = math.sqrt(0.5)


def vec(*values: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def close(actual: torch.Tensor, expected, tol: float = 1e-12) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def task_merge(method, base, deltas, weights, *, dtype=torch.float64, seed=None, **params):
    """Merge base + deltas with `method`: per-model params from keyword lists, globals otherwise."""
    base = torch.as_tensor(base, dtype=dtype)
    tensors = [base] + [base + torch.as_tensor(d, dtype=dtype) for d in deltas]
    per_model = [{}] + [{"weight": w} for w in weights]
    for name in ("density", "gamma", "epsilon"):
        if name in params:
            for entry, value in zip(per_model[1:], params.pop(name)):
                entry[name] = value
    return merge_tensors(method, tensors, per_model, params, base_index=0, seed=seed)


# -- registry ------------------------------------------------------------------------------------
def test_registry_names_params_and_defaults_match_mergekit_table():
    assert list(METHODS) == ALL_METHODS + NEW_METHODS + DATA_METHODS
    assert all(isinstance(spec, MethodSpec) and spec.name == name for name, spec in METHODS.items())
    defaults = {  # (normalize, rescale) from the reference table
        "task_arithmetic": (False, False),
        "ties": (True, False),
        "dare_ties": (False, True),
        "dare_linear": (False, True),
        "breadcrumbs": (False, False),
        "breadcrumbs_ties": (False, False),
        "della": (True, True),
        "della_linear": (False, True),
    }
    for name, (normalize, rescale) in defaults.items():
        spec = METHODS[name]
        assert spec.global_params == {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}
        assert spec.model_params["weight"] is None and spec.model_params["density"] == 1.0
        assert spec.base == "required" and spec.random == name.startswith(("dare", "della"))
    assert METHODS["breadcrumbs"].model_params["gamma"] == 0.01
    assert METHODS["della"].model_params["epsilon"] == 0.15
    assert METHODS["linear"].global_params == {"normalize": True} and METHODS["linear"].base == "unused"
    assert METHODS["slerp"].global_params == {"t": None}
    assert (METHODS["slerp"].min_models, METHODS["slerp"].max_models) == (2, 2)
    assert METHODS["nuslerp"].global_params == {"nuslerp_row_wise": False, "nuslerp_flatten": True}
    assert METHODS["nuslerp"].base == "optional"
    assert METHODS["model_stock"].min_models == 3 and METHODS["model_stock"].global_params == {"filter_wise": False}
    assert METHODS["passthrough"].max_models == 1
    assert all(spec.doc and "\n" not in spec.doc for spec in METHODS.values())
    # mergekit 0.1.5's names, parameters, defaults (None: required), base use and input counts.
    new_methods = {
        "multislerp": ({"weight": None}, {"normalize_weights": True, "eps": 1e-8}, "optional", (1, None)),
        "nearswap": ({}, {"t": None}, "required", (2, 2)),
        "ram": ({}, {"epsilon": 1e-5}, "required", (1, None)),
        "ramplus_tl": ({}, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, "required", (1, None)),
        "sce": ({}, {"int8_mask": False, "select_topk": 1.0}, "required", (1, None)),
        "arcee_fusion": ({}, {}, "required", (2, 2)),
        "karcher": ({}, {"max_iter": 10, "tol": 1e-5}, "unused", (1, None)),
    }
    for name, (model_params, global_params, base, counts) in new_methods.items():
        spec = METHODS[name]
        assert (spec.model_params, spec.global_params, spec.base) == (model_params, global_params, base), name
        assert (spec.min_models, spec.max_models) == counts and spec.random == (name == "arcee_fusion"), name


def test_get_method_unknown_name_suggests_close_match():
    assert get_method("ties") is METHODS["ties"]
    with pytest.raises(ValueError, match=r"unknown merge method 'tie'; expected one of: .*did you mean 'ties'"):
        get_method("tie")


# -- linear / passthrough --------------------------------------------------------------------------
def test_linear_weighted_average_and_sum():
    a, b = vec(1, 2), vec(3, 4)
    params = [{"weight": 1.0}, {"weight": 3.0}]
    close(merge_tensors("linear", [a, b], params, {}, None), [2.5, 3.5])  # (1*a + 3*b) / 4
    close(merge_tensors("linear", [a, b], params, {"normalize": False}, None), [10, 14])


def test_linear_base_is_one_more_weighted_input():
    a, b = vec(1, 2), vec(3, 4)
    out = merge_tensors("linear", [a, b], [{"weight": 1.0}, {"weight": 1.0}], {}, base_index=0)
    close(out, [2, 3])
    with pytest.raises(ValueError, match="'weight' for model 0"):
        merge_tensors("linear", [a, b], [{}, {"weight": 1.0}], {}, base_index=0)


def test_linear_zero_weight_sum_divides_by_one_difference_3():
    # mergekit divides by the ~0 sum (inf/NaN); we use divisor 1 like the task-vector methods.
    out = merge_tensors("linear", [vec(1, 2), vec(3, 4)], [{"weight": 1.0}, {"weight": -1.0}], {}, None)
    close(out, [-2, -2])


def test_passthrough_scale_and_copy():
    x = vec(1, -2, 3)
    close(merge_tensors("passthrough", [x], [{"scale": 2.0}], {}, None), [2, -4, 6])
    out = merge_tensors("passthrough", [x], [{}], {}, None)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


# -- slerp -----------------------------------------------------------------------------------------
def slerp(a, b, t, base_index=0):
    tensors = [a, b] if base_index == 0 else [b, a]
    return merge_tensors("slerp", tensors, [{}, {}], {"t": t}, base_index)


@pytest.mark.parametrize("base_index", [0, 1])
def test_slerp_orthogonal_vectors(base_index):
    e1, e2 = vec(1, 0, dtype=torch.float32), vec(0, 1, dtype=torch.float32)
    assert torch.equal(slerp(e1, e2, 0.0, base_index), e1)  # t=0 is the base, exactly
    assert torch.equal(slerp(e1, e2, 1.0, base_index), e2)
    close(slerp(e1, e2, 0.5, base_index), [R2, R2], 1e-6)
    # No magnitude renormalisation: coefficients act on the raw tensors.
    close(slerp(2 * e1, e2, 0.5, base_index), [2 * R2, R2], 1e-6)
    close(slerp(2 * e1, e2, 1 / 3, base_index), [math.sqrt(3), 0.5], 1e-6)


def test_slerp_parallel_and_antiparallel_fall_back_to_lerp():
    a = vec(1, 0, dtype=torch.float32)
    close(slerp(a, vec(2, 1e-4, dtype=torch.float32), 0.25), [1.25, 2.5e-5], 1e-7)
    close(slerp(a, vec(-3, 0, dtype=torch.float32), 0.5), [-1, 0], 1e-7)


def test_slerp_whole_matrix_is_one_vector_and_t0_is_base():
    torch.manual_seed(0)
    a, b = torch.randn(5, 7).to(torch.bfloat16), torch.randn(5, 7).to(torch.bfloat16)
    assert torch.equal(slerp(a, b, 0.0), a)
    out = slerp(a, b, 0.4)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 7)
    flat = slerp(a.reshape(-1), b.reshape(-1), 0.4)
    assert torch.equal(out.reshape(-1), flat)


# -- nuslerp ---------------------------------------------------------------------------------------
def test_nuslerp_without_base_weights_give_t():
    e1, e2 = vec(1, 0), vec(0, 1)
    out = merge_tensors("nuslerp", [e1, e2], [{"weight": 1.0}, {"weight": 1.0}], {}, None)
    close(out, [R2, R2])
    out = merge_tensors("nuslerp", [e1, e2], [{"weight": 1.0}, {"weight": 3.0}], {}, None)  # t = 3/4
    close(out, [math.sin(math.pi / 8), math.sin(3 * math.pi / 8)])
    out = merge_tensors("nuslerp", [e1, e2], [{"weight": 1.0}, {"weight": -1.0}], {}, None)  # sum 0 -> t = 1/2
    close(out, [R2, R2])


def test_nuslerp_with_base_interpolates_deltas():
    base = vec(10, 10)
    out = merge_tensors(
        "nuslerp", [vec(11, 10), base, vec(10, 11)], [{"weight": 1.0}, {}, {"weight": 1.0}], {}, base_index=1
    )
    close(out, [10 + R2, 10 + R2])


def test_nuslerp_per_row_and_per_column():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    params = [{"weight": 1.0}, {"weight": 1.0}]
    rows = merge_tensors("nuslerp", [a, b], params, {"nuslerp_flatten": False}, None)
    # Row 0: orthogonal, slerp. Row 1: colinear, lerp.
    close(rows, [[R2, R2], [1.5, 0.0]])
    cols = merge_tensors("nuslerp", [a, b], params, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, None)
    # Column 0: [1,1] vs [0,2], 45 degrees apart. Column 1: zero vs [1,0] (norm clamped, cos 0).
    s = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    close(cols, [[s * 1, R2], [s * 3, 0.0]])


# -- task arithmetic -------------------------------------------------------------------------------
def test_task_arithmetic_weighted_sum_negation_lambda_and_normalize():
    base = [1.0, 2.0, 3.0]
    deltas = [[1.0, 0.0, -1.0], [2.0, 2.0, 2.0]]
    close(task_merge("task_arithmetic", base, deltas, [1.0, 0.5]), [3, 3, 3])
    close(task_merge("task_arithmetic", base, deltas[:1], [-1.0]), [0, 2, 4])  # negation
    close(task_merge("task_arithmetic", base, deltas, [1.0, 0.5], **{"lambda": 2.0}), [5, 4, 3])
    close(task_merge("task_arithmetic", base, deltas, [1.0, 0.5], normalize=True), [1 + 2 / 1.5, 2 + 1 / 1.5, 3])
    # density is accepted and ignored, as in mergekit
    close(task_merge("task_arithmetic", base, deltas, [1.0, 0.5], density=[0.1, 0.1]), [3, 3, 3])


@pytest.mark.parametrize("method", TASK_VECTOR_METHODS)
def test_lone_base_is_returned_as_a_copy(method):
    base = vec(1, 2, 3)
    out = merge_tensors(method, [base], [{}], {}, base_index=0)
    assert torch.equal(out, base) and out.data_ptr() != base.data_ptr()


# -- ties ------------------------------------------------------------------------------------------
def test_ties_sign_election_by_weighted_mass_and_disjoint_mean():
    # weighted deltas: [3, -1, 2] and 0.5 * [-2, 2, 1] = [-1, 1, 0.5]; sum [2, 0, 2.5] -> all +
    # (0 counts as +). Agreeing: model 1 at 0 and 2, model 2 at 1 and 2.
    # mixed = [3, 1, 2.5], divisor = sum of agreeing weights = [1, 0.5, 1.5].
    base, deltas, weights = [1.0, 1.0, 1.0], [[3.0, -1.0, 2.0], [-2.0, 2.0, 1.0]], [1.0, 0.5]
    close(task_merge("ties", base, deltas, weights), [4, 3, 1 + 2.5 / 1.5])
    close(task_merge("ties", base, deltas, weights, normalize=False), [4, 2, 3.5])


def test_ties_trims_per_model_and_pruned_entries_do_not_count():
    # density 2/3 on 3 entries keeps 2 per model: [3, 0, 2] and [-2, 2, 0]; sum [1, 2, 2] -> all +.
    # Entry 2: only model 1 is nonzero, so the divisor there is 1, not 2.
    out = task_merge("ties", [0.0] * 3, [[3.0, -1.0, 2.0], [-2.0, 2.0, 1.0]], [1.0, 1.0], density=[2 / 3, 2 / 3])
    close(out, [3, 2, 2])


def test_ties_negative_weight_flips_the_vote():
    # weighted deltas 1 and -2: the majority is negative, only model 2 agrees.
    deltas, weights = [[1.0]], [1.0]
    close(task_merge("ties", [0.0], deltas + [[1.0]], weights + [-2.0], normalize=False), [-2])
    # normalised by the agreeing weight (-2): mergekit's disjoint mean gives +1 here
    close(task_merge("ties", [0.0], deltas + [[1.0]], weights + [-2.0]), [1])


def test_ties_density_one_keeps_all_and_equals_consensus_without_trim():
    torch.manual_seed(1)
    base, deltas = torch.randn(6, 5), [torch.randn(6, 5) for _ in range(3)]
    full = task_merge("ties", base, deltas, [0.3, 0.5, 0.9], dtype=torch.float32)
    assert torch.equal(full, task_merge("ties", base, deltas, [0.3, 0.5, 0.9], density=[1, 1, 1], dtype=torch.float32))
    assert torch.equal(
        full, task_merge("breadcrumbs_ties", base, deltas, [0.3, 0.5, 0.9], normalize=True, dtype=torch.float32)
    )


def test_ties_zero_k_keeps_the_largest_difference_2():
    # int(0.1 * 5) == 0: mergekit 0.1.4 asserted; we (like 0.1.5) keep the single largest entry.
    out = task_merge("ties", [1.0] * 5, [[5.0, 4.0, 3.0, 2.0, 1.0]], [1.0], density=[0.1])
    close(out, [6.0, 1.0, 1.0, 1.0, 1.0])
    close(sparsify.magnitude(vec(5, -6, 3, 2, 1), 0.1), [0, -6, 0, 0, 0])
    assert torch.equal(sparsify.magnitude(vec(5, 4), 0.0), torch.zeros(2, dtype=torch.float64))


def test_magnitude_top_k_over_whole_tensor():
    x = torch.tensor([[0.1, -5.0], [4.0, 0.2]], dtype=torch.float64)
    close(sparsify.magnitude(x, 0.5), [[0, -5], [4, 0]])  # top 2 of the whole tensor, not per row
    # Equal magnitudes: which one survives follows torch's sort (as in mergekit); exactly k do.
    kept = sparsify.magnitude(vec(1, -1, 1, 0.5), 0.5)
    assert torch.count_nonzero(kept) == 2 and kept[3] == 0 and set(kept.abs().tolist()) == {0.0, 1.0}
    close(sparsify.magnitude(vec(3, 1, 2, 4), 0.5, rescale=True), [3 * 10 / 7, 0, 0, 4 * 10 / 7])  # L1 10 -> 7


# -- breadcrumbs -----------------------------------------------------------------------------------
DELTA_1_TO_10 = [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0]


def test_breadcrumbs_band_drops_outliers_and_smallest():
    # numel 10, density 0.5 -> keep 5; gamma 0.2 -> drop the 2 largest; so magnitudes 4..8.
    out = task_merge("breadcrumbs", [0.0] * 10, [DELTA_1_TO_10], [1.0], density=[0.5], gamma=[0.2])
    close(out, [0, 0, 0, -4, 5, -6, 7, -8, 0, 0])
    # density 0.9, gamma 0.2: 9 kept leaves room to drop only 1 outlier.
    out = task_merge("breadcrumbs", [0.0] * 10, [DELTA_1_TO_10], [1.0], density=[0.9], gamma=[0.2])
    close(out, DELTA_1_TO_10[:9] + [0.0])


def test_breadcrumbs_no_outliers_keeps_top_band_difference_1():
    # int(0.01 * 10) == 0 outliers: mergekit 0.1.4 zeroed the whole delta; we keep the top 3.
    out = task_merge("breadcrumbs", [0.0] * 10, [DELTA_1_TO_10], [1.0], density=[0.3])  # default gamma 0.01
    close(out, [0.0] * 7 + [-8.0, 9.0, -10.0])
    out = task_merge("breadcrumbs", [0.0] * 10, [DELTA_1_TO_10], [1.0], density=[0.3], gamma=[0.0])
    close(out, [0.0] * 7 + [-8.0, 9.0, -10.0])


def test_breadcrumbs_ties_elects_signs_after_the_band():
    # numel 3, density 1/3 -> keep 1, gamma 1/3 -> drop the largest: each model keeps its middle
    # magnitude: [0, 3, 0] and [-2, 0, 0]. Signs: [-, +, + (0)], no conflicts left.
    out = task_merge(
        "breadcrumbs_ties",
        [0.0] * 3,
        [[1.0, 3.0, 5.0], [-2.0, -1.0, 4.0]],
        [1.0, 1.0],
        density=[1 / 3, 1 / 3],
        gamma=[1 / 3, 1 / 3],
    )
    close(out, [-2, 3, 0])


# -- dare ------------------------------------------------------------------------------------------
def big_delta(seed=0, shape=(300, 400), dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def test_dare_keeps_density_fraction_and_l1_rescale_preserves_norm():
    delta = big_delta(shape=(100, 200))
    out = sparsify.dare(delta, 0.3, sparsify.make_generator(7, 1, "cpu"))
    kept = out != 0
    n = delta.numel()
    assert abs(kept.sum().item() - 0.3 * n) < 4 * math.sqrt(0.3 * 0.7 * n)
    assert math.isclose(sparsify.l1_norm(out), sparsify.l1_norm(delta), rel_tol=1e-6)
    ratio = sparsify.l1_norm(delta) / sparsify.l1_norm(delta * kept)
    torch.testing.assert_close(out[kept], delta[kept] * ratio, rtol=1e-6, atol=0)
    plain = sparsify.dare(delta, 0.3, sparsify.make_generator(7, 1, "cpu"), rescale=False)
    assert torch.equal(plain, delta * kept)


def test_dare_density_edges():
    delta = big_delta(shape=(10, 10))
    assert sparsify.dare(delta, 1.0, None) is delta
    assert torch.equal(sparsify.dare(delta, 0.0, None), torch.zeros_like(delta))
    base = torch.zeros(10, 10)
    for method in ("dare_linear", "dare_ties"):
        out = merge_tensors(method, [base, delta], [{}, {"weight": 1.0, "density": 0.0}], {}, 0, seed=3)
        assert torch.equal(out, base)


@pytest.mark.parametrize(
    "random_method,plain_method",
    [("dare_linear", "task_arithmetic"), ("dare_ties", "ties"), ("della_linear", "task_arithmetic"), ("della", "ties")],
)
def test_random_methods_at_density_one_are_their_deterministic_counterparts(random_method, plain_method):
    torch.manual_seed(2)
    base, deltas = torch.randn(8, 9), [torch.randn(8, 9) for _ in range(3)]
    normalize = METHODS[random_method].global_params["normalize"]
    ours = task_merge(random_method, base, deltas, [0.4, 0.7, -0.2], dtype=torch.float32, seed=5)
    plain = task_merge(plain_method, base, deltas, [0.4, 0.7, -0.2], dtype=torch.float32, normalize=normalize)
    assert torch.equal(ours, plain)


# -- della -----------------------------------------------------------------------------------------
def test_della_probabilities_by_rank():
    # ascending ranks 0, 2, 1, 3 of 3 -> p = 0.4 + 0.2 * rank / 3
    probabilities = sparsify.della_probabilities(vec(0.1, -0.3, 0.2, 0.4), 0.5, 0.1)
    close(probabilities, [0.4, 0.5 + 0.1 / 3, 0.5 - 0.1 / 3, 0.6], 1e-6)
    rows = torch.tensor([[1.0, 2.0], [4.0, -3.0]])
    close(sparsify.della_probabilities(rows, 0.5, 0.1), [[0.4, 0.6], [0.6, 0.4]], 1e-6)  # ranked per row
    tied = sparsify.della_probabilities(vec(1, -1, 1), 0.5, 0.1)  # equal |x|: distinct ranks all the same
    close(tied.sort().values, [0.4, 0.5, 0.6], 1e-6)
    close(sparsify.della_probabilities(torch.ones(3, 1), 0.5, 0.1), [[0.5]] * 3, 1e-6)  # rows of one: density


def test_della_keeps_large_magnitudes_more_often_and_preserves_l1():
    delta = torch.linspace(-1, 1, 40_000)[torch.randperm(40_000, generator=torch.Generator().manual_seed(0))]
    out = sparsify.della(delta, 0.5, 0.2, sparsify.make_generator(0, 1, "cpu"))
    kept = out != 0
    magnitude = delta.abs()
    top, bottom = magnitude > 0.9, magnitude < 0.1
    assert kept[top].float().mean() > 0.65 and kept[bottom].float().mean() < 0.35
    assert abs(kept.float().mean().item() - 0.5) < 0.02
    assert math.isclose(sparsify.l1_norm(out), sparsify.l1_norm(delta), rel_tol=1e-6)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("density,epsilon", [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5)])
def test_della_rejects_probabilities_outside_unit_interval(method, density, epsilon):
    base = torch.zeros(4)
    params = [{}, {"weight": 1.0, "density": density, "epsilon": epsilon}]
    with pytest.raises(ValueError, match=r"density.*epsilon.*model 1"):
        merge_tensors(method, [base, torch.ones(4)], params, {}, 0)


def test_della_density_one_ignores_epsilon():
    base, other = torch.zeros(4), torch.ones(4)
    out = merge_tensors("della_linear", [base, other], [{}, {"weight": 1.0, "density": 1.0, "epsilon": 0.5}], {}, 0)
    assert torch.equal(out, other)


# -- model stock -----------------------------------------------------------------------------------
def test_model_stock_two_models_t_from_cosine():
    base = vec(1, 1)
    cos = R2  # deltas [1, 0] and [1, 1]
    t = 2 * cos / (1 + cos)
    out = merge_tensors("model_stock", [base, base + vec(1, 0), base + vec(1, 1)], [{}, {}, {}], {}, 0)
    close(out, [1 + t, 1 + 0.5 * t])


def test_model_stock_three_models_mean_pairwise_cosine():
    base = vec(0, 0)
    others = [vec(1, 0), vec(0, 1), vec(1, 1)]
    cos = (0 + R2 + R2) / 3
    t = 3 * cos / (1 + 2 * cos)
    out = merge_tensors("model_stock", [base, *others], [{}] * 4, {}, 0)
    close(out, [t * 2 / 3, t * 2 / 3])


def test_model_stock_orthogonal_and_opposed_keep_base():
    base = vec(2, 3)
    out = merge_tensors("model_stock", [base, base + vec(1, 0), base + vec(0, 1)], [{}] * 3, {}, 0)
    close(out, base)  # cos 0 -> t 0
    out = merge_tensors("model_stock", [base, base + vec(1, 1), base - vec(1, 1)], [{}] * 3, {}, 0)
    close(out, base)  # cos -1 -> 1 + (N-1) cos = 0: no finite t, keep the base


def test_model_stock_filter_wise_one_t_per_row():
    base = torch.zeros(2, 2, dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    out = merge_tensors("model_stock", [base, a, b], [{}] * 3, {"filter_wise": True}, 0)
    close(out, [[0, 0], [1.5, 1.5]])  # row 0 orthogonal (t 0), row 1 parallel (t 1: the mean)


# -- dtypes, aliasing, determinism -----------------------------------------------------------------
def example_call(method: str, dtype=torch.bfloat16, shape=(6, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    count = {"slerp": 2, "passthrough": 1, "nuslerp": 3, "linear": 3}.get(method, 4)
    tensors = [torch.randn(shape, generator=generator).to(dtype) for _ in range(count)]
    spec = METHODS[method]
    base_index = None if spec.base == "unused" else 0
    params = [{}]
    for index in range(1, count):
        entry = {"weight": 0.3 + 0.2 * index} if "weight" in spec.model_params else {}
        if "density" in spec.model_params:
            entry["density"] = 0.5
        params.append(entry)
    if base_index is None and "weight" in spec.model_params:
        params[0] = {"weight": 0.2}
    return tensors, params, ({"t": 0.3} if method == "slerp" else {}), base_index


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_half_precision_in_same_dtype_out_inputs_untouched_no_aliasing(method, dtype):
    tensors, params, options, base_index = example_call(method, dtype=dtype)
    before = [t.clone() for t in tensors]
    out = merge_tensors(method, tensors, params, options, base_index, seed=1)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))  # inputs are never modified
    assert out.dtype == dtype and out.shape == tensors[0].shape
    assert torch.isfinite(out.float()).all()
    assert all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in tensors)


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if METHODS[m].random])
def test_random_methods_reproduce_bit_identically(method):
    tensors, params, options, base_index = example_call(method, dtype=torch.float32, shape=(60, 80))
    first = merge_tensors(method, tensors, params, options, base_index, seed=11)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(first, merge_tensors(method, tensors, params, options, base_index, seed=11))
    assert not torch.equal(first, merge_tensors(method, tensors, params, options, base_index, seed=12))
    assert torch.equal(
        merge_tensors(method, tensors, params, options, base_index, seed=None),
        merge_tensors(method, tensors, params, options, base_index, seed=0),
    )


@pytest.mark.parametrize("method", ["dare_ties", "della", "ties", "slerp", "model_stock", "nuslerp"])
def test_results_do_not_depend_on_threads_or_merge_order(method):
    # 192 x 256 elements: large enough for torch to split reductions across threads.
    first, second = (example_call(method, dtype=torch.float32, shape=(192, 256), seed=s) for s in (0, 1))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = [merge_tensors(method, *first, seed=21), merge_tensors(method, *second, seed=22)]
        torch.set_num_threads(2)  # and the other order
        two_threads = [merge_tensors(method, *second, seed=22), merge_tensors(method, *first, seed=21)][::-1]
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(one_thread, two_threads))


def test_seed_of_one_model_does_not_depend_on_the_others():
    base, a, b, c = (big_delta(seed=s, shape=(50, 60)) for s in range(4))
    zero = {"weight": 0.0, "density": 0.5}
    one = {"weight": 1.0, "density": 0.5}
    with_b = merge_tensors("dare_linear", [base, a, b], [{}, one, zero], {}, 0, seed=9)
    with_c = merge_tensors("dare_linear", [base, a, c], [{}, one, zero], {}, 0, seed=9)
    assert torch.equal(with_b, with_c)


# -- bad inputs ------------------------------------------------------------------------------------
Z, O = torch.zeros(3), torch.ones(3)  # noqa: E741 (short names keep the table below one call a line)
W1 = {"weight": 1.0}
BAD_CALLS = [  # (method, tensors, model_params, global_params, base_index), expected message
    (("slerp", [Z, O, O], [{}] * 3, {"t": 0.5}, 0), r"slerp needs exactly 2 models \(a base and one other\), got 3"),
    (("slerp", [Z, O], [{}] * 2, {}, 0), r"slerp needs global parameter 't'"),
    (("ties", [Z, O], [{}, {"density": 0.5}], {}, 0), r"ties needs parameter 'weight' for model 1"),
    (("ties", [Z, O], [{}, {**W1, "densty": 0.5}], {}, 0), r"'densty'.*did you mean 'density'"),
    (("ties", [Z, O], [{}, W1], {"normalise": True}, 0), r"'normalise'.*did you mean 'normalize'"),
    (("ties", [Z, O], [{}, W1], {"normalize": "yes"}, 0), r"'normalize' must be true or false"),
    (("ties", [Z, O], [{}, {"weight": float("nan")}], {}, 0), r"'weight' of model 1 must be finite"),
    (("ties", [Z, O], [{}, {"weight": "x"}], {}, 0), r"'weight' of model 1 must be a number"),
    (("ties", [Z, O], [{}, W1], {}, None), r"ties needs a base model"),
    (("ties", [Z, O], [{}, W1], {}, 2), r"base_index 2 is out of range"),
    (("ties", [Z, O], [{}], {}, 0), r"got 1 model_params dicts for 2 tensors"),
    (("ties", [Z, torch.ones(4)], [{}, W1], {}, 0), r"same shape"),
    (("linear", [torch.zeros(3, dtype=torch.int64)], [W1], {}, None), r"floating-point"),
    (("linear", [], [], {}, None), r"at least one tensor"),
    (("breadcrumbs", [Z, O], [{}, {**W1, "gamma": -0.1}], {}, 0), r"gamma of model 1"),
    (("nuslerp", [Z, O, O], [W1] * 3, {}, None), r"nuslerp needs exactly 2 non-base"),
    (("model_stock", [Z, O], [{}] * 2, {}, 0), r"model_stock needs at least 3 models"),
    (("passthrough", [Z, O], [{}] * 2, {}, None), r"passthrough needs exactly 1 model, got 2"),
    (("tie", [Z, O], [{}] * 2, {}, 0), r"did you mean 'ties'"),
]


@pytest.mark.parametrize("args,message", BAD_CALLS, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(BAD_CALLS)])
def test_bad_inputs_raise_value_error_naming_the_field(args, message):
    with pytest.raises(ValueError, match=message):
        merge_tensors(*args)


# -- blocked evaluation: radix top-k, per-block masks, in-place output --------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 500, 2999, 3000, 4999])
def test_top_k_cut_is_the_kth_largest(dtype, k):
    generator = torch.Generator().manual_seed(k)
    key = torch.randn(5000, generator=generator).to(dtype).abs().float()  # bf16/fp16: many ties
    key[:7] = 0.0
    blocks_of = lambda: iter(key.split(333))  # noqa: E731
    cut, greater, tied = sparsify.top_k_cut(blocks_of, k, single_level=dtype == torch.bfloat16)
    expected = torch.sort(key, descending=True).values[k - 1]
    assert cut.item() == expected.item()
    assert greater == int((key > expected).sum()) and tied == int((key == expected).sum())
    assert 1 <= k - greater <= tied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.001, 0.3, 0.5, 0.97])
@pytest.mark.parametrize("block", [64, 997, 5000])
def test_magnitude_cut_by_blocks_keeps_what_magnitude_mask_keeps(dtype, density, block):
    generator = torch.Generator().manual_seed(7)
    delta = (torch.randn(5000, generator=generator) * 0.01).to(dtype)  # bf16: ties at the cut
    key = delta.abs().float()
    k = max(1, int(density * key.numel()))
    cut = sparsify.MagnitudeCut(*sparsify.top_k_cut(lambda: iter(key.split(block)), k), k)
    blocked = torch.cat([cut.mask(part) for part in key.split(block)])
    assert torch.equal(blocked, sparsify.magnitude_mask(delta, density))
    assert int(blocked.sum()) == k


@pytest.mark.parametrize("block", [1, 97, 4096, 10_000])
def test_dare_mask_drawn_by_blocks_has_the_same_bits(block):
    """A CPU generator gives the same stream in pieces as in one draw (what blocked DARE needs)."""
    count, density = 9_999, 0.37
    whole = sparsify.dare_mask(torch.empty(count), density, sparsify.make_generator(5, 1, "cpu"))
    spans = [(start, min(start + block, count)) for start in range(0, count, block)]
    pieces = sparsify.dare_mask_blocks(count, density, sparsify.make_generator(5, 1, "cpu"), torch.device("cpu"), spans)
    assert torch.equal(pieces, whole)


@pytest.mark.parametrize("method", ["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "della", "model_stock"])
def test_merge_into_out_writes_the_same_values_in_place(method):
    tensors = [t.to(torch.bfloat16) for t in torch.randn(3, 64, 48, generator=torch.Generator().manual_seed(3))]
    if method == "slerp":
        tensors = tensors[:2]
    names = [name for name in ("weight", "density") if name in METHODS[method].model_params]
    params = [{name: value for name in names} for value in (0.3, 0.5, 0.2)][: len(tensors)]
    options = {"t": 0.3} if method == "slerp" else {}
    expected = merge_tensors(method, tensors, params, options, 0, seed=11)
    out = torch.full_like(tensors[0], float("nan"))
    returned = merge_tensors(method, tensors, params, options, 0, seed=11, out=out)
    assert returned.data_ptr() == out.data_ptr()
    assert torch.equal(out, expected)


def test_merge_into_a_wrong_out_is_refused():
    tensors = [torch.ones(4, 3), torch.zeros(4, 3)]
    for bad in (torch.empty(3, 4), torch.empty(4, 3, dtype=torch.float64), torch.empty(3, 4).t()):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            merge_tensors("linear", tensors, [{"weight": 1}, {"weight": 1}], {}, None, out=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_entry_anywhere(dtype, bad):
    from evomerge.merge.engine import all_finite

    clean = torch.randn(100_003, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert all_finite(clean) and all_finite(clean[:0]) and all_finite(torch.arange(5))
    for position in (0, 1, 4096, 65_537, 100_002):
        spoiled = clean.clone()
        spoiled[position] = bad
        assert not all_finite(spoiled)
