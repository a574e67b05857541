"""The fused C kernel (evomerge/merge/native.py) against the eager torch kernels, bit for bit.

A trial's weight hash is recorded from whichever path merged it, and `evomerge export` must
reproduce it on a machine that may have no C compiler: the two paths must agree on every bit,
signed zeros and position-ordered ties at a TIES cut included.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from evomerge.merge import native, sparsify
from evomerge.merge.methods import DeltaCache, merge_tensors


@pytest.fixture
def use_native(monkeypatch):
    """Switch between the fused kernel and the eager kernels inside one test."""

    def switch(enabled: bool) -> None:
        monkeypatch.setenv("EVOMERGE_NATIVE", "1" if enabled else "0")
        native.reset()

    switch(True)
    if native.library() is None:
        pytest.skip("no C compiler here: the fused kernel cannot be built")
    yield switch
    native.reset()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32 if tensor.element_size() == 4 else torch.int16)


def adversarial_inputs(dtype, models, size, seed):
    """A base and `models` fine-tunes with the cases that break a careless kernel: unchanged
    entries (zero deltas), many equal magnitudes at any cut, signed zeros, mixed scales."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(size, generator=generator)
    base[::7] = -0.0
    sources = []
    for index in range(models):
        delta = torch.randn(size, generator=generator) * 10.0 ** -(index % 3 + 1)
        delta[: size // 4] = 0.0  # unchanged entries
        delta[size // 4 :: 3] = 0.015625 * (-1) ** index  # one magnitude, many times: ties at the cut
        sources.append(base + delta)
    return [base.to(dtype)] + [source.to(dtype) for source in sources]


CASES = [
    ("task_arithmetic", {}, {}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}, {}),
    ("ties", {}, {}),
    ("ties", {"normalize": False, "lambda": 1.3}, {}),
    ("dare_ties", {}, {}),
    ("dare_linear", {"rescale": False}, {}),
    ("breadcrumbs_ties", {}, {"gamma": 0.05}),
    ("della_linear", {}, {"epsilon": 0.1}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("models", [1, 2, 5])
def test_fused_kernel_matches_eager_bit_for_bit(use_native, dtype, models):
    weights = [0.4, -0.7, 1.0, 0.25, 0.6][:models]
    for size, (method, options, extra), density in itertools.product((1, 301, 70001), CASES, (0.0, 0.3, 0.5, 1.0)):
        if method.startswith("della") and density in (0.0, 1.0):
            density = 0.5
        tensors = adversarial_inputs(dtype, models, size, seed=size + models)
        params = [{}] + [{"weight": w, "density": density, **extra} for w in weights]
        results = []
        for enabled in (False, True):
            use_native(enabled)
            results.append(merge_tensors(method, tensors, params, options, 0, seed=5))
        assert torch.equal(bits(results[0]), bits(results[1])), (method, options, size, density)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_ties_cut_keeps_equal_magnitudes_in_position_order(use_native, dtype):
    """All |delta| equal: the cut keeps exactly the first k entries (a stable sort's choice),
    whether the ties are settled after the pass (float32) or in the stream, across the kernel's
    256-entry chunks (bf16, fp16)."""
    size, density = 1000, 0.37
    base = torch.zeros(size, dtype=dtype)
    source = torch.full((size,), 0.5, dtype=dtype)
    source[::2] = -0.5
    merged = merge_tensors("ties", [base, source], [{}, {"weight": 1.0, "density": density}], {}, 0)
    keep = int(density * size)
    assert torch.equal(merged[:keep], source[:keep])
    assert torch.equal(merged[keep:], torch.zeros(size - keep, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_non_finite_inputs_stay_non_finite_where_eager_says(use_native, dtype, method):
    """NaN and Inf must survive the kernel's integer rounding: a broken merge has to fail the
    NaN/Inf check, never come out finite. Finite entries still agree bit for bit."""
    tensors = adversarial_inputs(dtype, 3, 3000, seed=9)
    tensors[1][::97] = float("nan")
    tensors[2][5::89] = float("inf")
    tensors[0][7::211] = float("-inf")
    params = [{}] + [{"weight": w, "density": 0.4} for w in (0.5, -0.3, 1.2)]
    results = []
    for enabled in (False, True):
        use_native(enabled)
        results.append(merge_tensors(method, tensors, params, {}, 0, seed=2))
    eager, fused = results
    assert torch.equal(eager.isnan(), fused.isnan()) and torch.equal(eager.isinf(), fused.isinf())
    finite = eager.isfinite()
    assert not finite.all() and torch.equal(bits(eager[finite]), bits(fused[finite]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_every_16_bit_pattern_rounds_as_torch_does(use_native, dtype, method):
    """The kernel converts and rounds 16-bit floats with integer ops (so its loops vectorise):
    every finite bit pattern as a source and as a base, with weights whose products land on
    subnormals, on ties to even and past the largest finite value, must give eager's bits."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[every.isfinite()]
    shuffled = every[torch.randperm(every.numel(), generator=torch.Generator().manual_seed(3))]
    tensors = [shuffled, every, every.flip(0)]
    params = [{}, {"weight": 0.3, "density": 0.6}, {"weight": 1.7, "density": 0.6}]
    results = []
    for enabled in (False, True):
        use_native(enabled)
        results.append(merge_tensors(method, tensors, params, {}, 0))
    eager, fused = results
    assert torch.equal(eager.isnan(), fused.isnan()) and torch.equal(eager.isinf(), fused.isinf())
    finite = eager.isfinite()
    assert torch.equal(bits(eager[finite]), bits(fused[finite]))


def test_bf16_register_election_is_built_where_the_cpu_has_avx512_bf16(use_native):
    """The bf16 TIES figures in results/search.md come from fused.c's register election: a
    build that silently lost it (flags, compiler) would still pass every bit test, only slower."""
    if not {"avx512f", "avx512_bf16"} <= set(native.cpu_flags_line().split()):
        pytest.skip("no AVX-512 BF16 on this CPU: bf16 TIES chunks take the generic loop")
    assert native.bf16_register_election()


@pytest.mark.parametrize("chunks", [12, 1100], ids=["whole-tensor-cut", "radix-cut"])
@pytest.mark.parametrize("options", [{}, {"normalize": False, "lambda": 1.3}], ids=["normalized", "lambda"])
def test_bf16_ties_chunks_around_a_non_finite_entry_give_eager_bits(use_native, options, chunks):
    """A bf16 TIES chunk holding a NaN or Inf must be declined by the register election (its
    sums would skip a NaN delta that eager carries into the output) while the finite chunks
    around it are elected in registers: each non-finite entry sits alone in its own chunk.
    Both paths count a NaN delta among the k largest (mergekit's argsort does), so the ties kept
    at the cut agree too, for the eager path's whole-tensor and radix cuts alike."""
    chunk = 256
    tensors = adversarial_inputs(torch.bfloat16, 3, chunk * chunks, seed=4)
    # Finite, every chunk here but those where a model's TIES cut falls (2 of 12, 1 of 1100) is
    # elected in registers; the one non-finite entry in a chunk must make it decline.
    tensors[1][chunk * 2 + 5] = float("nan")  # a NaN delta
    tensors[1][chunk * (chunks - 1) + 5] = float("nan")
    tensors[2][chunk * (chunks - 3) + 17] = float("inf")  # an Inf delta
    tensors[3][chunk * (chunks - 5) + 40] = float("-inf")
    tensors[0][chunk * (chunks - 6) + 30] = float("nan")  # a NaN base
    tensors[0][chunk * (chunks - 2) + 3] = float("inf")
    params = [{}] + [{"weight": w, "density": density} for w, density in ((0.5, 0.4), (-0.3, 1.0), (1.2, 0.7))]
    results = []
    for enabled in (False, True):
        use_native(enabled)
        results.append(merge_tensors("ties", tensors, params, options, 0))
    eager, fused = results
    assert eager[chunk * (chunks - 1) + 5].isnan() and eager[chunk * (chunks - 6) + 30].isnan()
    assert torch.equal(eager.isnan(), fused.isnan()) and torch.equal(eager.isinf(), fused.isinf())
    finite = eager.isfinite()
    assert torch.equal(bits(eager[finite]), bits(fused[finite]))


def test_cached_histograms_give_the_same_bits_and_are_computed_once(use_native):
    tensors = adversarial_inputs(torch.float32, 3, 50_000, seed=1)
    keys = [("base", "w"), ("a", "w"), ("b", "w"), ("c", "w")]
    cache = DeltaCache()
    for density in (0.2, 0.5, 0.9):
        params = [{}] + [{"weight": 0.5, "density": density}] * 3
        cached = merge_tensors("ties", tensors, params, {}, 0, cache=cache, cache_keys=keys)
        assert torch.equal(bits(cached), bits(merge_tensors("ties", tensors, params, {}, 0)))
    assert len(cache) == 3  # one histogram per (model, base) pair, reused for every density


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size, zero_share", [(400_000, 0.0), (20_000, 0.3), (40, 0.25)])
def test_key_histogram_selection_matches_a_sort(use_native, dtype, size, zero_share):
    """Dense and sparse forms, zero deltas kept apart: the same bucket and counts as a full sort."""
    generator = torch.Generator().manual_seed(size)
    base = torch.randn(size, generator=generator).to(dtype)
    source = (base.float() + torch.randn(size, generator=generator) * 0.01).to(dtype)
    source[: int(zero_share * size)] = base[: int(zero_share * size)]
    histogram = sparsify.KeyHistogram.of(native.key_histogram(base, source))
    if size == 40 or dtype == torch.float32:  # a few keys over a wide range: sparse; many: dense
        assert (histogram.buckets is None) == (size == 400_000)
    keys = (source - base).abs().float().sort(descending=True).values
    high = keys.view(torch.int32) >> native.KEY_SHIFT[dtype]
    for k in sorted({1, 7, size // 3, size // 2, size - size // 4, size - 1, size}):
        bucket, greater, inside = histogram.kth_largest(k)
        assert int(high[k - 1]) == bucket, k
        assert greater == int((high > bucket).sum()) and inside == int((high == bucket).sum()), k


def test_resident_materialize_fills_the_delta_cache(use_native, demo_family):
    from evomerge.merge.plan import MergePlan, TensorRecipe
    from evomerge.merge.resident import ResidentSources, materialize

    models = {"base": demo_family.base, "ft": demo_family.finetunes[demo_family.skills[0]]}
    sources = ResidentSources(models, dtype=torch.float32)
    names = [name for name, tensor in sources.tensors["base"].items() if tensor.dim() == 2][:3]
    recipes = tuple(
        TensorRecipe(
            name=name,
            method="ties",
            inputs=(("base", name), ("ft", name)),
            base_index=0,
            model_params=({}, {"weight": 1.0, "density": 0.3}),
            global_params={},
            shape=tuple(sources.get("base", name).shape),
        )
        for name in names
    )
    plan = MergePlan(
        models=models, tensors=recipes, math_dtype=None, out_dtype=torch.float32,
        config_donor="base", tokenizer_donor="base", num_hidden_layers=1,
    )  # fmt: skip
    target = {name: torch.empty_like(sources.get("base", name)) for name in names}
    materialize(plan, sources, target)
    assert len(sources.delta_cache) == len(names)
    use_native(False)
    for recipe in recipes:
        expected = merge_tensors("ties", [sources.get(*i) for i in recipe.inputs], recipe.model_params, {}, 0)
        assert torch.equal(bits(target[recipe.name]), bits(expected))


def test_without_a_compiler_merges_fall_back_to_eager(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("EVOMERGE_NATIVE", "1")
    monkeypatch.setenv("EVOMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="evomerge.merge.native"):
            assert native.library() is None
        assert "eager torch kernels" in caplog.text
        tensors = adversarial_inputs(torch.float32, 2, 500, seed=3)
        params = [{}, {"weight": 1, "density": 0.5}, {"weight": 1, "density": 0.5}]
        fallback = merge_tensors("ties", tensors, params, {}, 0)
        monkeypatch.delenv("CC")
        native.reset()
        if native.library() is not None:  # a machine with a compiler: the same bits either way
            assert torch.equal(bits(fallback), bits(merge_tensors("ties", tensors, params, {}, 0)))
    finally:
        native.reset()


def test_the_kernel_is_built_once_into_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOMERGE_NATIVE", "1")
    monkeypatch.setenv("EVOMERGE_CACHE_DIR", str(tmp_path))
    native.reset()
    try:
        if native.library() is None:
            pytest.skip("no C compiler here: the fused kernel cannot be built")
        built = list((tmp_path / "native").glob("fused-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.reset()
        assert native.library() is not None
        assert built[0].stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt
    finally:
        native.reset()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("EVOMERGE_NATIVE", "0")
    native.reset()
    try:
        assert native.library() is None
        assert not native.supports(torch.float32)
    finally:
        native.reset()
