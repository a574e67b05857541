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
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.dtypes import safetensors_dtypes
from evomerge.errors import EvomergeError, first_line


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # file name inside the model directory
    offset: int = 0  # absolute byte offset of the data in `file` (safetensors only)
    nbytes: int = 0


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of one safetensors file, from its JSON header alone.

    The header is checked against the file: every entry well formed, its byte span the size its
    shape and dtype need, and inside the file (a truncated download is caught here, not half way
    through a merge or a search).
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise EvomergeError(f"{path}: not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > 100 * 2**20:
                raise EvomergeError(f"{path}: not a safetensors file (header length {header_len})")
            if 8 + header_len > file_size:
                raise EvomergeError(
                    f"{path}: truncated file (the header alone needs {8 + header_len} bytes, the file has {file_size})"
                )
            raw_header = handle.read(header_len)
    except OSError as exc:
        raise EvomergeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EvomergeError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise EvomergeError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_start = 8 + header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _tensor_info(path, name, entry, data_start, file_size)
    return infos


def _tensor_info(path: Path, name: str, entry: object, data_start: int, file_size: int) -> TensorInfo:
    """One header entry, checked: known dtype, a shape of sizes, a byte span that fits it and the file."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise EvomergeError(f"{path}: tensor {name}: malformed header entry (expected dtype, shape and data_offsets)")
    dtype = safetensors_dtypes().get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise EvomergeError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise EvomergeError(f"{path}: tensor {name}: malformed shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise EvomergeError(f"{path}: tensor {name}: malformed data_offsets {offsets!r}")
    begin, end = offsets
    needed = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != needed:
        raise EvomergeError(
            f"{path}: tensor {name}: the header gives {end - begin} bytes, its shape {shape} needs {needed}"
        )
    if data_start + end > file_size:
        raise EvomergeError(
            f"{path}: truncated file (tensor {name} ends at byte {data_start + end}, the file has {file_size}); download it again"
        )
    return TensorInfo(tuple(shape), dtype, path.name, data_start + begin, end - begin)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvomergeError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise EvomergeError(f"{path}: not a JSON text file") from None
    except OSError as exc:
        raise EvomergeError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickle state dict through torch's weights-only unpickler; one-line errors for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = first_line(exc, 200)
        raise EvomergeError(
            f"{path}: refused or unreadable by torch's weights-only loader ({first}); convert it to safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise EvomergeError(f"{path}: expected a state dict of tensor names to tensors")
    return state


class ModelDir:
    """One local HF checkpoint: its config.json and lazily readable tensors."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise EvomergeError(
                f"{path}: not a local model directory (evomerge reads local checkpoints; download models first)"
            )
        config_path = self.path / "config.json"
        if not config_path.is_file() and (self.path / "adapter_config.json").is_file():
            raise EvomergeError(
                f"{self.path}: a PEFT (LoRA) adapter, not a full model: give it with its base, as "
                f"BASE+{self.path} (a mergekit YAML's model:) or name@BASE+{self.path} (a space's models:)"
            )
        if not config_path.is_file():
            raise EvomergeError(f"{self.path}: no config.json (expected a Hugging Face model directory)")
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise EvomergeError(f"{config_path}: expected a JSON object (a Hugging Face model config)")
        self.config: dict = config
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._fds: dict[str, int] = {}
        self._fds_lock = threading.Lock()
        self._find_weights(allow_pickle)

    def _find_weights(self, allow_pickle: bool) -> None:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            index_data = _read_json(index)
            weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise EvomergeError(f"{index}: expected a 'weight_map' of tensor names to shard files")
            for file_name in sorted(set(weight_map.values())):
                shard_path = self.path / file_name
                if Path(file_name).name != file_name:
                    raise EvomergeError(f"{index}: shard {file_name!r} is not a file name inside the model directory")
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
                state = _load_pickle(pickle_path)
                for name, tensor in state.items():
                    self._pickled[name] = tensor
                    self.tensors[name] = TensorInfo(tuple(tensor.shape), tensor.dtype, pickle_path.name)
            return
        raise EvomergeError(f"{self.path}: no weights found (expected model.safetensors or a sharded index)")

    # -- config facts -------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures")
        if isinstance(archs, list) and archs:
            return str(archs[0])
        return str(archs if isinstance(archs, str) else self.config.get("model_type", "unknown"))

    @property
    def num_hidden_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in self.config:
                return self._config_int(self.config, key)
        text_config = self.config.get("text_config")
        if isinstance(text_config, dict) and "num_hidden_layers" in text_config:
            return self._config_int(text_config, "num_hidden_layers")
        return None

    def _config_int(self, config: dict, key: str) -> int:
        value = config[key]
        if type(value) is not int or value < 0:
            raise EvomergeError(f"{self.path / 'config.json'}: {key}: expected a whole number, got {value!r}")
        return value

    def find_non_finite(self) -> str | None:
        """The first floating-point tensor holding NaN or Inf (reads every tensor), else None."""
        for name, info in self.tensors.items():
            if info.dtype.is_floating_point and not bool(torch.isfinite(self.get(name)).all()):
                return name
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
