"""Worker threads: a single in-process worker runs with the Ray actors' settings (passive OpenMP
waiting, a thread count chosen for the machine), checked in OpenMP's own report of its settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.threads import available_cores, worker_threads

REPO = Path(__file__).resolve().parents[1]


def openmp_spin_count(code: list[str], **extra_env: str) -> str:
    """GOMP_SPINCOUNT as libgomp reports it at start-up (0: passive; 300000: its default spinning)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env.update(
        extra_env,
        OMP_DISPLAY_ENV="VERBOSE",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    done = subprocess.run(code, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = [line.split("=", 1)[1].strip(" '") for line in done.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    assert counts, "libgomp printed no settings: is torch built with GNU OpenMP?"
    return counts[0]


def test_the_console_script_starts_openmp_with_passive_waiting():
    script = Path(sys.executable).with_name("evomerge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "evomerge.cli"]
    assert openmp_spin_count([*command, "methods"]) == "0"  # `methods` loads torch: after evomerge set the policy


def test_torch_imported_before_evomerge_keeps_spinning_and_is_detected():
    probe = (
        "import torch, evomerge.threads as t; torch.ones(2).sum(); "
        "assert not t.passive_openmp_in_effect() and t.torch_loaded_without_policy()"
    )
    assert openmp_spin_count([sys.executable, "-c", probe]) == "300000"
    probe = (
        "import evomerge.threads as t, torch; torch.ones(2).sum(); "
        "assert t.passive_openmp_in_effect() and not t.torch_loaded_without_policy()"
    )
    assert openmp_spin_count([sys.executable, "-c", probe]) == "0"
    probe = (
        "import torch, evomerge.threads as t; torch.ones(2).sum(); "  # the user's own choice: no warning
        "assert not t.passive_openmp_in_effect() and not t.torch_loaded_without_policy()"
    )
    assert openmp_spin_count([sys.executable, "-c", probe], OMP_WAIT_POLICY="ACTIVE") not in ("0", "300000")


def test_thread_count_for_a_worker(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = available_cores()
    for load, idle in [(0.0, cores), (0.9, cores), (1.0, max(1, cores - 1)), (cores + 5.0, 1)]:
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert worker_threads() == idle, load  # a single worker: one thread per core others leave idle
    assert worker_threads(1.0) == 1 and worker_threads(2.5) == 2  # a Ray actor: its CPUs
    assert available_cores() <= len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice, for the worker that has the machine
    assert worker_threads() == 3 and worker_threads(1.0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert worker_threads() == 1  # not a count: ignored (the load set above leaves one core)


@pytest.mark.slow
def test_in_process_pool_uses_the_chosen_threads_and_restores_them(tmp_path, demo_family, monkeypatch):
    import torch

    from evomerge.config.space import load_space
    from evomerge.workers.pool import InProcessPool, make_pool

    skill = demo_family.skills[0]
    data = {
        "models": [f"{skill}@{demo_family.finetunes[skill]}"],
        "base_model": f"base@{demo_family.base}",
        "dtype": "float32",
        "device": "cpu",
        "genome": {"methods": ["task_arithmetic"]},
        "objectives": [{"task": f"demo_{skill}"}],
        "eval": {"include_paths": [str(REPO / "tasks")], "limit": 2},
        "search": {"n_trials": 1},
    }
    space_file = tmp_path / "space.yml"
    space_file.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool = make_pool(load_space(space_file))
        assert isinstance(pool, InProcessPool) and torch.get_num_threads() == 3
        pool.close()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
