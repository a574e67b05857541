"""Seeds for the merge's random masks, derived from names and indices, never from call order.

blake2b, not hash(): Python's string hashing is salted per process, and a mask must be the same
in every worker and every run. Changing a derivation changes every DARE/DELLA weight hash.
"""

from __future__ import annotations

import hashlib

_SEED_BITS = 63  # torch.Generator.manual_seed takes a non-negative int64


def stable_seed(key: str) -> int:
    """A 63-bit seed that is a pure function of `key`."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << _SEED_BITS) - 1)


def tensor_seed(run_seed: int, tensor_name: str) -> int:
    """The seed of one output tensor's masks (independent of tensor order and threads)."""
    return stable_seed(f"{run_seed}\x00{tensor_name}")


def model_seed(seed: int | None, index: int) -> int:
    """The seed of model `index`'s mask within a tensor whose `tensor_seed` is `seed` (None: 0)."""
    return stable_seed(f"{0 if seed is None else int(seed)}/{int(index)}")
