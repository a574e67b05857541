"""Thread settings for candidate workers: OpenMP's wait policy and torch's thread count.

A worker runs many short torch operations (an in-place merge, then lm-eval's small forward
passes). With OpenMP's default policy the threads spin between operations; when anything else
competes for the cores (other workers, other users) the spinning threads steal the time the
working one needs, and a trial gets many times slower (results/scaling.md). Passive waiting
avoids it. libgomp reads OMP_WAIT_POLICY once, when torch loads it, so the variable must be in
the environment before torch is first imported in a process: `prefer_passive_openmp` runs when
`evomerge` is imported (the CLI and library use), and Ray actors get it in their runtime_env.

Importing this module must stay cheap: no torch here.
"""

from __future__ import annotations

import math
import os
import sys

WAIT_POLICY = "PASSIVE"
# Whether the policy was in the environment when torch was loaded (None: torch not loaded yet).
_torch_loaded_before_policy: bool | None = None


def prefer_passive_openmp() -> None:
    """Put OMP_WAIT_POLICY=PASSIVE in the environment unless the user chose a policy.

    Only effective before torch is imported; if it already was, the process keeps the policy it
    started with (see `passive_openmp_in_effect`).
    """
    global _torch_loaded_before_policy
    if "torch" in sys.modules:
        _torch_loaded_before_policy = "OMP_WAIT_POLICY" not in os.environ
        return
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def passive_openmp_in_effect() -> bool:
    """True when this process's OpenMP runtime was started with a passive wait policy."""
    if _torch_loaded_before_policy:
        return False
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == WAIT_POLICY


def torch_loaded_without_policy() -> bool:
    """True when torch was loaded before evomerge could choose the policy and nobody had chosen one
    (a library user who imported torch first): the process spins. A policy the user set is theirs."""
    return bool(_torch_loaded_before_policy)


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as limits:
            quota, period = limits.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def idle_cores() -> int:
    """Available cores that other processes do not already keep busy, at least one.

    Busy cores: the 1-minute load average, whole processes only (floor; an idle machine's load
    is a fraction). On a loaded machine one thread per idle core beats one per core, because
    threads that must wait for a busy core hold the others up at every parallel step
    (results/scaling.md). In a container the load average is the host's: it can only make the
    count smaller, never larger than the container's quota.
    """
    cores = available_cores()
    try:
        busy = math.floor(min(os.getloadavg()[0], cores))
    except OSError:
        busy = 0
    return max(1, cores - busy)


def worker_threads(cpus: float | None = None) -> int:
    """torch threads for one candidate worker.

    `cpus`: the CPUs reserved for the worker (a Ray actor's num_cpus): that many, as Ray's
    scheduling assumes. None for a worker that has the machine to itself (one in-process worker):
    OMP_NUM_THREADS when the user set it, else one per idle core (`idle_cores`).
    """
    if cpus is not None:
        return max(1, int(cpus))
    chosen = os.environ.get("OMP_NUM_THREADS", "").strip()
    if chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    return idle_cores()
