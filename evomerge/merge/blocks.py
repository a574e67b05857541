"""Cache-blocked evaluation: run a chain of elementwise ops block by block, not op by op.

A merge is a chain of elementwise ops over tensors of millions of entries. Evaluated op by op
on whole tensors, every op streams all entries through DRAM and allocates a full-size
temporary (fresh pages, so page faults on CPU). Evaluated over blocks of 64K entries, the whole
chain runs in the CPU cache and reuses small buffers (benchmarks/merge_speed.py measures the
end-to-end gain).

The results are bit-identical to whole-tensor evaluation as long as every op in the chain is
elementwise or reduces over the model axis only, which is how the methods use it. Scalar
statistics that need the whole tensor (norms, top-k cuts, masks) are computed in a first pass.

Accelerators run each tensor as one block: their cost is kernel launches, not cache misses.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Entries per block on CPU: 64K float32 (256 KiB) per operand keeps a method's working set
# (a few operands per model) inside a 2 MiB L2 cache; larger blocks spill out of it.
CPU_BLOCK = 1 << 16


def block_size(device: torch.device) -> int:
    return CPU_BLOCK if device.type == "cpu" else 1 << 62


def blocks(count: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive blocks covering `count` flat entries."""
    step = block_size(device)
    for start in range(0, count, step):
        yield start, min(start + step, count)


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view (a copy only for non-contiguous inputs, which checkpoints never hold)."""
    return tensor.reshape(-1)
