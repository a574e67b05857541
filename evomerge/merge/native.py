"""The fused task-vector kernel (`fused.c`): built with the system C compiler at first use,
cached on disk, loaded with ctypes.

Optional by design: with no C compiler, a failed build, or `EVOMERGE_NATIVE=0`, merges take the
eager torch path, which gives the same bits (tests/test_native.py holds the two together). We
wrote a C kernel instead of using torch.compile because inductor builds with fast-math flags
(reassociation, finite-math), and a trial's weight hash must be reproducible bit for bit by
`evomerge export` on any machine; here the build pins `-ffp-contract=off` and plain IEEE math.
The kernel is plain C on raw pointers (no torch headers), so it builds in about a second.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("fused.c")
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=gnu11", "-shared", "-fPIC")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KEEP, CUT, ZERO, MASK = 0, 1, 2, 3
# TIES cut buckets: |delta| as float32 bits >> shift. bf16 and fp16 keys are exact at these
# shifts (their low float32 bits are 0); float32 keeps 18 bits, 1024 buckets per power of 2
# (~0.06% of entries per bucket at the median: the few the kernel settles in a second pass).
KEY_SHIFT = {torch.float32: 13, torch.bfloat16: 16, torch.float16: 13}
EXACT_KEYS = (torch.bfloat16, torch.float16)  # a bucket is one value: ties settle in the stream

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def _cache_dir() -> Path:
    root = os.environ.get("EVOMERGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "evomerge"
    )
    return Path(root) / "native"


def _cpu_fingerprint() -> str:
    """-march=native code is only valid on a CPU with the same features: key the cache on them."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\n".join([_SOURCE.read_text(), " ".join(_FLAGS), version, _cpu_fingerprint()]).encode()
    ).hexdigest()[:20]
    target = _cache_dir() / f"fused-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: concurrent builders (Ray workers) never see half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, *_FLAGS, "-o", str(built), str(_SOURCE)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "compiler failed")
        os.replace(built, target)
    return target


def _load() -> ctypes.CDLL | None:
    if os.environ.get("EVOMERGE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: merges use the eager torch kernels (same results, slower)")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("fused merge kernel unavailable (%s): using the eager torch kernels", exc)
        return None
    pointer, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    library.evm_task_vectors.restype = i64
    library.evm_task_vectors.argtypes = [
        i32, i64, pointer, pointer, i32, pointer, pointer, pointer, i32, pointer, pointer,
        pointer, i32, i32, f32, f32, pointer, i64,
    ]
    library.evm_key_histogram.restype = None
    library.evm_key_histogram.argtypes = [i32, i64, pointer, pointer, i32, pointer]
    return library


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None when it cannot be had here (decided once per process)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]


def reset() -> None:
    """Forget the load decision (tests switch EVOMERGE_NATIVE on and off)."""
    with _lock:
        _state.clear()


def supports(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype in DTYPE_CODES and library() is not None


def _pointers(values) -> ctypes.Array:
    return (ctypes.c_void_p * len(values))(*values)


def task_vectors(
    base: torch.Tensor,
    sources: list[torch.Tensor],
    weights: list[float],
    modes: list[int],
    buckets: list[int],
    wanted: list[int],
    masks: list[torch.Tensor | None],
    factors: list[float | None],
    *,
    consensus: bool,
    normalize: bool,
    divisor: float,
    lam: float,
    out: torch.Tensor,
    capacity: int,
) -> int:
    """The fused chain over flat contiguous CPU tensors of one dtype, written into `out`.

    Per model: a mode (KEEP, CUT, ZERO, MASK); for CUT the histogram bucket of the cut and how
    many entries inside it to keep; for MASK a bool mask and an optional rescale factor.
    `capacity` bounds the entries inside all CUT buckets together. Returns how many entries
    needed the exact second pass."""
    lib = library()
    assert lib is not None, "native kernel not available"
    n = len(sources)
    found = lib.evm_task_vectors(
        DTYPE_CODES[base.dtype],
        out.numel(),
        base.data_ptr(),
        _pointers([s.data_ptr() for s in sources]),
        n,
        (ctypes.c_float * n)(*weights),
        (ctypes.c_int32 * n)(*modes),
        (ctypes.c_uint32 * n)(*buckets),
        KEY_SHIFT[base.dtype],
        (ctypes.c_int64 * n)(*wanted),
        _pointers([m.data_ptr() if m is not None else None for m in masks]),
        (ctypes.c_float * n)(*[1.0 if f is None else f for f in factors]),  # x * 1.0 == x, bit for bit
        int(consensus),
        int(normalize),
        divisor,
        lam,
        out.data_ptr(),
        capacity,
    )
    if found < 0:
        raise RuntimeError(f"fused merge kernel failed (code {found}) on {out.numel()} entries")
    return found


def key_histogram(base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Counts of float32(|source - base|) bits >> KEY_SHIFT, the delta in the tensors' dtype."""
    lib = library()
    assert lib is not None, "native kernel not available"
    shift = KEY_SHIFT[base.dtype]
    counts = torch.zeros(1 << (31 - shift), dtype=torch.int64)
    code, pointers = DTYPE_CODES[base.dtype], (base.data_ptr(), source.data_ptr())
    lib.evm_key_histogram(code, base.numel(), *pointers, shift, counts.data_ptr())
    return counts
