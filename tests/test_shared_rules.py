"""The rules many modules share, each defined once: seeds, dtype names, did-you-mean hints."""

import pytest
import torch

from evomerge.dtypes import dtype_name, normalize_dtype, safetensors_codes, safetensors_dtypes, torch_dtype
from evomerge.merge.seeds import model_seed, tensor_seed
from evomerge.suggest import did_you_mean


def test_seeds_are_pinned():
    # Every DARE/DELLA weight hash depends on these numbers.
    assert tensor_seed(0, "model.layers.0.mlp.up_proj.weight") == 409872981816625765
    assert tensor_seed(7, "lm_head.weight") == 9055991753803385173
    assert model_seed(12345, 3) == 8838000430844729584
    assert model_seed(None, 1) == model_seed(0, 1) == 5496625243978593791


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bf16", torch.bfloat16), ("half", torch.float16)])
def test_dtype_names_round_trip(name, dtype):
    assert torch_dtype(normalize_dtype(name)) is dtype
    assert normalize_dtype(dtype_name(dtype)) == dtype_name(dtype)


def test_unknown_dtype_names_are_refused():
    with pytest.raises(ValueError, match="expected one of float32, bfloat16, float16, got 'float8'"):
        normalize_dtype("float8")
    with pytest.raises(KeyError):
        torch_dtype("bf16")  # callers pass the normalized name


def test_safetensors_codes_read_what_they_write_except_float8():
    readable = safetensors_dtypes()
    for dtype, code in safetensors_codes().items():
        assert readable.get(code) is (None if dtype_name(dtype).startswith("float8") else dtype)


def test_did_you_mean_variants():
    assert did_you_mean("tie", ["ties", "linear"]) == "; did you mean 'ties'?"
    assert did_you_mean("tie", ["ties", "linear"], parenthesised=True) == " (did you mean 'ties'?)"
    assert did_you_mean("zzz", ["ties", "linear"]) == ""
    metrics = ["acc_norm,none", "acc,none"]
    assert did_you_mean("acc", metrics, same_as=lambda m: m.split(",", 1)[0]) == "; did you mean 'acc,none'?"
