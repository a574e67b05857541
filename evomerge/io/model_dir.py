"""A local Hugging Face model directory, read lazily tensor by tensor.

Only the safetensors headers are parsed up front (names, shapes, dtypes: enough to validate a
whole merge before any tensor is read). Each tensor is then read on demand with one `pread`
into a fresh buffer. Unlike a memory map, pages already read do not stay in the process's
resident set, so a streaming merge's memory is the tensors in flight, whatever the model size
(the OS page cache still serves repeated reads). Pickle checkpoints (`*.bin`) are refused
unless the caller opts in, and then loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import EvomergeError

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # file name inside the model directory
    offset: int = 0  # absolute byte offset of the data in `file` (safetensors only)
    nbytes: int = 0


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of one safetensors file, from its JSON header alone."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise EvomergeError(f"{path}: not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > 100 * 2**20:
            raise EvomergeError(f"{path}: not a safetensors file (header length {header_len})")
        header = json.loads(handle.read(header_len))
    data_start = 8 + header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise EvomergeError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        infos[name] = TensorInfo(tuple(entry["shape"]), dtype, path.name, data_start + begin, end - begin)
    return infos


class ModelDir:
    """One local HF checkpoint: its config.json and lazily readable tensors."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise EvomergeError(
                f"{path}: not a local model directory (evomerge reads local checkpoints; download models first)"
            )
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise EvomergeError(f"{self.path}: no config.json (expected a Hugging Face model directory)")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise EvomergeError(f"{config_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._fds: dict[str, int] = {}
        self._fds_lock = threading.Lock()
        self._find_weights(allow_pickle)

    def _find_weights(self, allow_pickle: bool) -> None:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for file_name in sorted(set(weight_map.values())):
                shard_path = self.path / file_name
                if not shard_path.is_file():
                    raise EvomergeError(f"{index}: shard {file_name} is missing")
                self.tensors.update(read_safetensors_header(shard_path))
            return
        if single.is_file():
            self.tensors.update(read_safetensors_header(single))
            return
        others = sorted(self.path.glob("*.safetensors"))
        if others:
            for shard_path in others:
                self.tensors.update(read_safetensors_header(shard_path))
            return
        pickles = sorted(self.path.glob("pytorch_model*.bin"))
        if pickles:
            if not allow_pickle:
                raise EvomergeError(
                    f"{self.path}: only pickle weights (pytorch_model*.bin) found; they can run code when loaded. "
                    "Convert to safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True)"
                )
            self._pickled = {}
            for pickle_path in pickles:
                state = torch.load(pickle_path, map_location="cpu", weights_only=True, mmap=True)
                for name, tensor in state.items():
                    self._pickled[name] = tensor
                    self.tensors[name] = TensorInfo(tuple(tensor.shape), tensor.dtype, pickle_path.name)
            return
        raise EvomergeError(f"{self.path}: no weights found (expected model.safetensors or a sharded index)")

    # -- config facts -------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return str(archs[0])

    @property
    def num_hidden_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in self.config:
                return int(self.config[key])
        text_config = self.config.get("text_config")
        if isinstance(text_config, dict) and "num_hidden_layers" in text_config:
            return int(text_config["num_hidden_layers"])
        return None

    @property
    def total_bytes(self) -> int:
        return sum(
            torch.Size(info.shape).numel() * torch.empty((), dtype=info.dtype).element_size()
            for info in self.tensors.values()
        )

    # -- tensors ------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, its stored dtype)."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor named {name}")
        if self._pickled is not None:
            return self._pickled[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        fd = self._fds.get(info.file)
        if fd is None:
            with self._fds_lock:
                fd = self._fds.get(info.file)
                if fd is None:
                    fd = self._fds[info.file] = os.open(self.path / info.file, os.O_RDONLY)
        buffer = bytearray(info.nbytes)
        view = memoryview(buffer)
        done = 0
        while done < info.nbytes:  # preadv may return short reads on huge tensors
            got = os.preadv(fd, [view[done:]], info.offset + done)
            if got <= 0:
                raise EvomergeError(f"{self.path / info.file}: truncated file (tensor {name})")
            done += got
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r}, {len(self.tensors)} tensors)"
