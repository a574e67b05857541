"""Which entries of a tensor are read: all of a small tensor, a seeded stratified sample of a big one.

A sample is `entries // span` contiguous spans of `span` entries, one at a random place inside
each of as many equal strata of the flattened tensor: every entry has the same chance to be
read (so scaled sums are unbiased), the whole tensor is covered, and each span is one `pread`.
The places are a pure function of (seed, tensor name), so every model is read at the same
positions, in every run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from evomerge.errors import EvomergeError
from evomerge.inspect.defaults import DEFAULT_ENTRIES, DEFAULT_SPAN
from evomerge.io.model_dir import ModelDir
from evomerge.merge.seeds import tensor_seed


@dataclass(frozen=True)
class Sampling:
    entries: int = DEFAULT_ENTRIES  # per tensor; 0 reads every entry
    span: int = DEFAULT_SPAN  # contiguous entries per read
    seed: int = 0

    def spans(self, name: str, numel: int) -> list[tuple[int, int]] | None:
        """(start, length) of each span to read, or None to read the whole tensor."""
        if self.entries <= 0 or numel <= self.entries:
            return None
        span = min(self.span, self.entries)
        count = self.entries // span
        stratum = numel // count
        generator = torch.Generator().manual_seed(tensor_seed(self.seed, name))
        offsets = torch.randint(0, stratum - span + 1, (count,), generator=generator).tolist()
        return [(i * stratum + offset, span) for i, offset in enumerate(offsets)]

    def describe(self) -> str:
        if self.entries <= 0:
            return "every entry of every tensor"
        return (
            f"all entries of tensors up to {self.entries:,}; a sample of {self.entries:,} entries from larger ones "
            f"({self.entries // min(self.span, self.entries)} spans of {min(self.span, self.entries):,}, "
            f"stratified, seed {self.seed})"
        )


class EntryReader:
    """Reads a tensor's entries (whole, or only the sampled spans) as a flat float32 tensor.

    Spans are read with `pread` straight from the safetensors files (the rest of the tensor is
    never read); pickle checkpoints, already in memory, are indexed instead.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read(self, model: ModelDir, name: str, spans: list[tuple[int, int]] | None) -> torch.Tensor:
        info = model.tensors[name]
        numel = torch.Size(info.shape).numel()
        if spans is None:
            return model.get(name).reshape(-1).float()
        if info.nbytes == 0 and numel:  # a pickle checkpoint: the tensor is in memory already
            flat = model.get(name).reshape(-1)
            return torch.cat([flat[start : start + length] for start, length in spans]).float()
        item = info.nbytes // numel
        buffer = bytearray(sum(length for _, length in spans) * item)
        view = memoryview(buffer)
        fd = self._fd(model, info.file)
        at = 0
        for start, length in spans:
            want = length * item
            done = 0
            while done < want:
                got = os.preadv(fd, [view[at + done : at + want]], info.offset + start * item + done)
                if got <= 0:
                    raise EvomergeError(f"{model.path / info.file}: truncated file (tensor {name})")
                done += got
            at += want
        return torch.frombuffer(buffer, dtype=info.dtype).float()

    def _fd(self, model: ModelDir, file: str) -> int:
        path = str(model.path / file)
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> EntryReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
