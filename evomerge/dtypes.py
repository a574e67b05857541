"""Dtype names in one table: what a config may write, what torch calls it, what safetensors calls it.

Importing this module does not import torch, so validating a config stays fast; the torch side
of the table is built on first use.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Math and output dtypes a merge config or a search space may name, and their aliases.
MERGE_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}

# torch dtype name -> safetensors header code, for every dtype a checkpoint may hold.
_SAFETENSORS_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
# Written when this torch build has them; a source checkpoint holding them is refused.
_WRITE_ONLY_CODES = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def normalize_dtype(value: str) -> str:
    """'bf16' -> 'bfloat16'; ValueError (a pydantic field error) for anything unsupported."""
    value = DTYPE_ALIASES.get(value, value)
    if value not in MERGE_DTYPES:
        raise ValueError(f"expected one of {', '.join(MERGE_DTYPES)}, got {value!r}")
    return value


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a merge dtype name as `normalize_dtype` returns it; KeyError otherwise."""
    import torch

    if name not in MERGE_DTYPES:
        raise KeyError(name)
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16', the spelling config.json and weight hashes use."""
    return str(dtype).removeprefix("torch.")


@functools.cache
def safetensors_codes() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors code, for writing."""
    import torch

    codes = {getattr(torch, name): code for name, code in _SAFETENSORS_CODES.items()}
    codes.update({getattr(torch, name): code for name, code in _WRITE_ONLY_CODES.items() if hasattr(torch, name)})
    return codes


@functools.cache
def safetensors_dtypes() -> dict[str, torch.dtype]:
    """safetensors code -> torch dtype, for reading."""
    import torch

    return {code: getattr(torch, name) for name, code in _SAFETENSORS_CODES.items()}
