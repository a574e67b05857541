"""Streaming writing of safetensors checkpoints (`io/model_dir.py` reads them, tensor by tensor).

Every shard's header is laid out up front from the known names, shapes and dtypes, then each
tensor is written at its offset as soon as it is computed. A merge therefore holds a few tensors
in memory, never a whole shard, whatever the model size (mergekit buffers up to a shard, 5 GB by default).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.dtypes import safetensors_codes
from evomerge.errors import EvomergeError

_SIZE_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(text: str | int) -> int:
    """'5B', '500M', '2GB', 1000 -> bytes (decimal suffixes, as mergekit's --out-shard-size)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_SUFFIXES:
        raise EvomergeError(f"invalid size {text!r}: expected a number with an optional K/M/B suffix, e.g. 5B or 500M")
    return int(float(match.group(1)) * _SIZE_SUFFIXES[match.group(2).lower()])


@dataclass(frozen=True)
class TensorSlot:
    """Where one output tensor goes: which shard file and at which byte offset."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: int
    offset: int  # absolute byte offset in the shard file

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.dtype)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class StreamingCheckpointWriter:
    """Writes a (possibly sharded) safetensors checkpoint whose layout is known up front.

    Tensors may be written in any order and from several threads (each write is one
    `os.pwrite` at a precomputed offset). `close()` checks every tensor was written, then
    renames the shards into place and writes the index for sharded output.
    """

    def __init__(
        self,
        out_dir: Path,
        layout: Iterable[tuple[str, Sequence[int], torch.dtype]],
        *,
        max_shard_bytes: int = 5 * 10**9,
        metadata: Mapping[str, str] | None = None,
        prefix: str = "model",
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        entries = [(name, tuple(int(d) for d in shape), dtype) for name, shape, dtype in layout]
        names = [name for name, _, _ in entries]
        if len(set(names)) != len(names):
            raise ValueError("duplicate output tensor names in the layout")
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        shard_bytes = 0
        for entry in entries:
            size = _numel(entry[1]) * _itemsize(entry[2])
            if shards[-1] and shard_bytes + size > max_shard_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append(entry)
            shard_bytes += size
        self.num_shards = len(shards)
        self._final_names = (
            [f"{prefix}.safetensors"]
            if self.num_shards == 1
            else [f"{prefix}-{i + 1:05d}-of-{self.num_shards:05d}.safetensors" for i in range(self.num_shards)]
        )
        self._prefix = prefix
        self.slots: dict[str, TensorSlot] = {}
        self._fds: list[int] = []
        self._tmp_paths: list[Path] = []
        self._total_bytes = 0
        meta = {"format": "pt", **(metadata or {})}
        for shard_index, shard in enumerate(shards):
            header: dict[str, object] = {"__metadata__": meta}
            cursor = 0
            for name, shape, dtype in shard:
                code = safetensors_codes().get(dtype)
                if code is None:
                    raise ValueError(f"unsupported dtype {dtype} for tensor {name}")
                size = _numel(shape) * _itemsize(dtype)
                header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [cursor, cursor + size]}
                cursor += size
            header_bytes = json.dumps(header, separators=(",", ":")).encode()
            header_bytes += b" " * (-len(header_bytes) % 8)
            data_start = 8 + len(header_bytes)
            for name, shape, dtype in shard:
                begin = header[name]["data_offsets"][0]  # type: ignore[index]
                self.slots[name] = TensorSlot(name, shape, dtype, shard_index, data_start + begin)
            tmp_path = self.out_dir / f".{self._final_names[shard_index]}.partial"
            fd = os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, struct.pack("<Q", len(header_bytes)) + header_bytes, 0)
            os.ftruncate(fd, data_start + cursor)
            self._fds.append(fd)
            self._tmp_paths.append(tmp_path)
            self._total_bytes += cursor
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots.get(name)
        if slot is None:
            raise KeyError(f"tensor {name!r} is not in the checkpoint layout")
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ValueError(
                f"tensor {name}: got {tuple(tensor.shape)} {tensor.dtype}, layout expects {slot.shape} {slot.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        written = 0
        while written < len(view):  # pwrite may write less than asked for large buffers
            written += os.pwrite(self._fds[slot.shard], view[written:], slot.offset + written)
        self._written.add(name)

    def close(self) -> list[Path]:
        """Finish the checkpoint; returns the shard paths."""
        missing = set(self.slots) - self._written
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if missing:
            for tmp in self._tmp_paths:
                tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {sorted(missing)[:3]}")
        final_paths = []
        for tmp, final in zip(self._tmp_paths, self._final_names):
            target = self.out_dir / final
            os.replace(tmp, target)
            final_paths.append(target)
        if self.num_shards > 1:
            index = {
                "metadata": {"total_size": self._total_bytes},
                "weight_map": {name: self._final_names[slot.shard] for name, slot in sorted(self.slots.items())},
            }
            (self.out_dir / f"{self._prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final_paths

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        for tmp in self._tmp_paths:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamingCheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
