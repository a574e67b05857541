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

import array
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def _cache_dir() -> Path:
    root = os.environ.get("EVOMERGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "evomerge"
    )
    return Path(root) / "native"


def cpu_flags_line() -> str:
    """The `flags` line of /proc/cpuinfo: the features -march=native builds for ("" elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return ""


def _cpu_fingerprint() -> str:
    """-march=native code is only valid on a CPU with the same features: key the cache on them."""
    return f"{platform.machine()}|{cpu_flags_line()}"


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
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.evm_run_jobs.restype = i64
    library.evm_run_jobs.argtypes = [i64, pointer, pointer, pointer, pointer, pointer]
    library.evm_key_histogram.restype = None
    library.evm_key_histogram.argtypes = [i32, i64, pointer, pointer, i32, pointer]
    library.evm_features.restype = i32
    library.evm_features.argtypes = []
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


def bf16_register_election() -> bool:
    """Whether this build elects bf16 TIES signs in AVX-512 registers (fused.c's
    elect_lanes_bf16, compiled where the CPU has AVX-512 BF16): same bits, faster."""
    lib = library()
    return lib is not None and bool(lib.evm_features() & 1)


def supports(dtype: torch.dtype, device_type: str = "cpu") -> bool:
    """Whether the kernel can merge tensors of `dtype` on a `device_type` device here."""
    return device_type == "cpu" and dtype in DTYPE_CODES and library() is not None


class JobBatch:
    """Task-vector merges packed for one kernel call: a whole plan's tensors cost one ctypes
    call instead of one each (with its argument marshalling), which is most of the time a small
    model's re-merge takes. Pointers are raw addresses: the caller keeps every tensor, mask and
    histogram alive until `run` returns. The slot layout is `packed_job`'s in fused.c."""

    def __init__(self) -> None:
        self._ints = array.array("q")
        self._reals = array.array("d")
        self._starts = array.array("q")
        self._counts: list[int] = []
        self._labels: list[str] = []

    def __len__(self) -> int:
        return len(self._counts)

    def add(
        self,
        dtype: torch.dtype,
        count: int,
        base: int,
        out: int,
        sources: Sequence[int],
        weights: Sequence[float],
        modes: Sequence[int],
        ks: Sequence[int],
        *,
        masks: Sequence[int] | None = None,
        factors: Sequence[float] | None = None,
        histograms: Sequence[int] | None = None,
        consensus: bool,
        normalize: bool,
        divisor: float = 1.0,
        lam: float = 1.0,
        label: str = "",
    ) -> None:
        """One tensor of `count` entries: the merge of `sources` (data pointers, base excluded)
        against `base`, written to `out`. Per model: weight (rounded to the math dtype), mode
        (KEEP, CUT, ZERO, MASK), for CUT the top-k count and the `KeyHistogram.raw` of its
        |delta| (`histograms`: the models' 6 fields one after another, zeros where unused), for
        MASK a bool mask pointer and a rescale factor (1.0 for none)."""
        n = len(sources)
        ints = (
            job_prefix(dtype, count, n, base), (int(consensus), int(normalize), out), sources,
            trim_slots(modes, ks, masks), histograms or [0] * (6 * n),
        )  # fmt: skip
        self.add_slots(count, ints, merge_reals(divisor, lam, weights, factors), label)

    def add_slots(self, count: int, ints: Sequence[Sequence[int]], reals: Sequence[float], label: str) -> None:
        """One job already laid out in `packed_job`'s slots (fused.c), in parts: a search keeps
        the parts that do not change (job_prefix, sources, histograms; trim_slots and
        merge_reals per parameter set), so queueing a tensor copies a few arrays."""
        self._starts.extend((len(self._ints), len(self._reals)))
        for part in ints:
            self._ints.extend(part)
        self._reals.extend(reals)
        self._counts.append(count)
        self._labels.append(label)

    def run(self, workers: int = 1) -> list[int]:
        """Merge every job, on up to `workers` threads (the kernel runs without the GIL), the
        jobs dealt largest first to the least loaded thread. Returns per job the entries that
        needed the exact second pass."""
        lib = library()
        assert lib is not None, "native kernel not available"
        jobs = len(self._counts)
        results = array.array("q", bytes(8 * jobs))
        addresses = [a.buffer_info()[0] for a in (self._starts, self._ints, self._reals, results)]

        def call(order: array.array) -> None:
            lib.evm_run_jobs(len(order), order.buffer_info()[0], *addresses)

        groups = _deal(self._counts, workers)
        if len(groups) == 1:
            call(groups[0])
        else:
            with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="evomerge-fused") as pool:
                list(pool.map(call, groups))
        for job, found in enumerate(results):
            if found < 0:
                raise RuntimeError(
                    f"fused merge kernel failed (code {found}) on {self._labels[job] or f'job {job}'}"
                    f" ({self._counts[job]} entries)"
                )
        return results.tolist()


def job_prefix(dtype: torch.dtype, count: int, models: int, base: int) -> tuple[int, ...]:
    """The first slots of a job: dtype, entries, models, key shift, base pointer. Then come
    consensus, normalize and the output pointer, and per model the sources, then trim_slots."""
    return DTYPE_CODES[dtype], count, models, KEY_SHIFT[dtype], base


def trim_slots(modes: Sequence[int], ks: Sequence[int], masks: Sequence[int] | None = None) -> array.array:
    """Per model the trim mode, then per model the top-k count, then per model the mask pointer."""
    return array.array("q", [*modes, *ks, *(masks or [0] * len(modes))])


def merge_reals(divisor: float, lam: float, weights: Sequence[float], factors: Sequence[float] | None) -> array.array:
    """A job's float slots: the normaliser, lambda, the weights, the rescale factors (1.0: none)."""
    return array.array("d", [divisor, lam, *weights, *(factors or [1.0] * len(weights))])


def _deal(counts: Sequence[int], workers: int) -> list[array.array]:
    """Job indices split over at most `workers` groups of about equal entries (largest first)."""
    if workers <= 1 or len(counts) <= 1:
        return [array.array("q", range(len(counts)))]
    loads = [0] * min(workers, len(counts))
    groups = [array.array("q") for _ in loads]
    for job in sorted(range(len(counts)), key=counts.__getitem__, reverse=True):
        lightest = loads.index(min(loads))
        groups[lightest].append(job)
        loads[lightest] += counts[job]
    return groups


def key_histogram(base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Counts of float32(|source - base|) bits >> KEY_SHIFT, the delta in the tensors' dtype."""
    lib = library()
    assert lib is not None, "native kernel not available"
    shift = KEY_SHIFT[base.dtype]
    counts = torch.zeros(1 << (31 - shift), dtype=torch.int64)
    code, pointers = DTYPE_CODES[base.dtype], (base.data_ptr(), source.data_ptr())
    lib.evm_key_histogram(code, base.numel(), *pointers, shift, counts.data_ptr())
    return counts
