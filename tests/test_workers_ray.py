"""Ray worker pool: parallel candidates, a worker killed mid-trial, a 2-node cluster on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_search_e2e import write_space

from evomerge.config.space import load_space
from evomerge.search.fidelity import draw_item_order
from evomerge.search.runner import run_search
from evomerge.store.trial_store import TrialStore

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def ray_env(monkeypatch, tmp_path):
    # Loopback only, no auth token written to ~, no usage stats (dependencies.md, Ray section).
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_two_workers_run_a_dataflow_search(tmp_path, demo_family):
    """Each actor loads the sources and builds path models itself; the hashes match a local build."""
    from test_dataflow_search import write_dataflow_space

    from evomerge.dataflow.export import path_hash
    from evomerge.dataflow.sources import build_sources
    from evomerge.genome.kinds import make_genome

    space_file = write_dataflow_space(tmp_path, demo_family, n_trials=4)
    space_file.write_text(space_file.read_text().replace("finalists: 1", "finalists: 1\n  workers: 2"))
    space = load_space(space_file)
    events = []
    summary = run_search(space, progress=False, on_trial=events.append)
    assert summary.n_complete + summary.n_failed == 4 and summary.n_complete >= 2
    assert len({e["worker"] for e in events}) == 2
    genome = make_genome(space)
    store = TrialStore(space.storage_url)
    try:
        trials = store.trials(space.search.study_name, status="complete")
    finally:
        store.close()
    sources = build_sources(genome, list(genome.paths), dtype=torch.float32, device="cpu")
    for trial in trials:
        assert trial.weights_hash == path_hash(genome.path(trial.genome), sources)


def test_a_worker_killed_mid_trial_is_restarted_and_its_trial_retried(tmp_path, demo_family):
    from evomerge.workers.pool import RayPool

    space = load_space(write_space(tmp_path, demo_family, n_trials=7, sampler="random", limit=10, workers=2))
    pool = RayPool(space, 2)
    victim_pid = ray.get(pool.actors[0].pid.remote())
    original_submit = pool.submit
    state = {"submissions": 0, "killed": False}

    def submit_and_maybe_kill(params, split="search"):
        ticket = original_submit(params, split)
        state["submissions"] += 1
        busy = [index for _, index in pool._running.values()]
        if split == "search" and state["submissions"] >= 4 and not state["killed"] and 0 in busy:
            state["killed"] = True
            # As the kernel's OOM killer would: SIGKILL while the actor holds a candidate. At once,
            # not after a delay: a demo trial can finish in well under a second, and a worker killed
            # idle fails no trial (the test then failed by chance).
            os.kill(victim_pid, signal.SIGKILL)
        return ticket

    pool.submit = submit_and_maybe_kill
    try:
        summary = run_search(space, pool=pool, progress=False)
    finally:
        pool.close()
    assert state["killed"]
    store = TrialStore(space.storage_url)
    died = [t for t in store.trials("e2e", status="failed") if t.failure.startswith("RuntimeError: worker died")]
    assert len(died) == 1, [t.failure for t in store.trials("e2e", status="failed")]
    import optuna

    study = optuna.load_study(study_name="e2e", storage=space.storage_url)
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") == died[0].number]
    assert retried and retried[0].state.name == "COMPLETE"
    assert retried[0].params == study.trials[died[0].number].params
    # the study still completes its 7 trials: the retried failure does not use up the budget
    assert summary.n_complete == 7 and summary.n_failed == 1


def test_driver_killed_with_two_workers_resumes(tmp_path, demo_family):
    # no finalists: held-out re-scoring is not what is resumed here (the worker-killed test runs it on Ray)
    space_file = write_space(tmp_path, demo_family, n_trials=30, sampler="random", limit=10, workers=2, finalists=0)
    space = load_space(space_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "run", str(space_file), "-q"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        if Path(space.storage_url.removeprefix("sqlite:///")).exists():
            try:
                if len(TrialStore(space.storage_url).trials("e2e", status="complete")) >= 2:
                    break
            except Exception:
                pass
        time.sleep(1)
    assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    driver.wait()
    done = {t.number: t.weights_hash for t in TrialStore(space.storage_url).trials("e2e", status="complete")}
    summary = run_search(space, n_trials=len(done) + 4, progress=False)
    after = {t.number: t.weights_hash for t in TrialStore(space.storage_url).trials("e2e", status="complete")}
    assert all(after[n] == h for n, h in done.items())
    assert summary.n_complete >= len(done) + 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_node_cluster_on_loopback(tmp_path, demo_family):
    """`ray start --head` + `ray start --address` as two nodes in a private network namespace."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2)")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.decode().strip()}")
    bin_dir = Path(sys.executable).parent
    port = _free_port()
    temp = Path(f"/tmp/evr{os.getpid()}")  # Ray's socket paths must stay short
    space_file = write_space(tmp_path, demo_family, n_trials=4, sampler="random", limit=10, workers=2)
    text = space_file.read_text() + f"ray:\n  address: 127.0.0.1:{port}\n"
    space_file.write_text(text)
    script = textwrap.dedent(f"""
        set -u
        ip link set lo up
        # Only `lo` exists in this namespace, so several nodes can talk over loopback alone.
        export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
        export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
        # Stop exactly this cluster's processes (their command lines carry the temp dir, this
        # script's does not: it reads it from $EVR_TEMP); `ray stop` would kill every Ray on the machine.
        cleanup() {{ pkill -TERM -f "$EVR_TEMP" || true; sleep 2; pkill -KILL -f "$EVR_TEMP" || true; }}
        trap cleanup EXIT
        {bin_dir}/ray start --head --port={port} --num-cpus=1 --include-dashboard=false --temp-dir="$EVR_TEMP" --disable-usage-stats >/dev/null || exit 10
        {bin_dir}/ray start --address=127.0.0.1:{port} --num-cpus=1 --temp-dir="$EVR_TEMP" --disable-usage-stats >/dev/null || exit 11
        {bin_dir}/python - <<'PY' || exit 12
import ray
ray.init(address="127.0.0.1:{port}", logging_level="ERROR")
nodes = [n for n in ray.nodes() if n["Alive"]]
print("NODES", len(nodes), sorted({{n["NodeManagerAddress"] for n in nodes}}))
ray.shutdown()
PY
        {bin_dir}/evomerge run {space_file} -q >/dev/null || exit 13
    """)
    env = {**os.environ, "EVR_TEMP": str(temp)}
    completed = subprocess.run(
        ["unshare", "-n", "bash", "-c", script], capture_output=True, text=True, timeout=540, env=env
    )
    shutil.rmtree(temp, ignore_errors=True)
    assert completed.returncode == 0, completed.stdout[-1500:] + completed.stderr[-3000:]
    assert "NODES 2 ['127.0.0.1']" in completed.stdout
    store = TrialStore(load_space(space_file).storage_url)
    trials = store.trials("e2e", status="complete")
    assert len(trials) == 4


def test_two_workers_share_a_successive_halving_search(tmp_path, demo_family):
    """Two Ray actors share a search the driver started Ray for, and Ray is shut down after it.
    With eval.fidelity: the item ids and the references' answer margins (order: margin) come from
    an actor, each rung's items go to one."""
    import yaml

    path = write_space(
        tmp_path, demo_family, n_trials=6, sampler="random", limit=12, workers=2, finalists=0, enqueue=[]
    )
    data = yaml.safe_load(path.read_text())
    data["eval"]["fidelity"] = {"rungs": [4, "all"], "eta": 2, "promote_by": "weighted", "order": "margin"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    space = load_space(path)
    events = []
    summary = run_search(space, progress=False, on_trial=events.append)
    assert summary.n_complete + summary.n_pruned == 6 and summary.n_failed == 0 and summary.n_complete >= 1
    assert len({e["worker"] for e in events}) == 2  # both actors evaluated candidates
    assert summary.front and summary.best is not None
    assert not ray.is_initialized()  # the pool shut down the Ray it started
    store = TrialStore(space.storage_url)
    order = store.item_order(space.study_name)
    assert {len(ids) for ids in order.values()} == {12}
    assert order != draw_item_order({task: list(range(12)) for task in order}, space.search.seed)  # by margins
    rungs = store.rungs(space.study_name)
    assert all(rungs[r.number].keys() == {0, 1} for r in store.trials(space.study_name, status="complete"))
