"""Candidates scored by Ray actors (search.workers > 1, or a Ray cluster).

Each actor holds its own resident sources and model on its own device (one GPU per actor with
device: cuda), and up to N candidates are in flight. An actor that dies (killed, out of memory)
is restarted by Ray; the trial it was running comes back as a failure with the reason, and the
loop retries that genome once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from evomerge.config.space import SearchSpace
from evomerge.devices import resolve_device
from evomerge.errors import EvomergeError
from evomerge.io.lora import folders_of
from evomerge.offline import set_offline_defaults
from evomerge.threads import WAIT_POLICY, worker_threads
from evomerge.workers.protocol import TrialOutcome

if TYPE_CHECKING:
    from evomerge.evaluate.protocol import ItemIds, ItemScores, Margins, Scores
    from evomerge.genome.protocol import Genome


def _worker_env() -> dict[str, str]:
    keep = (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HF_DATASETS_CACHE",
        "HF_HOME",
        "TOKENIZERS_PARALLELISM",
        "TRANSFORMERS_OFFLINE",
    )
    env = {key: os.environ[key] for key in keep if key in os.environ}
    set_offline_defaults(env)
    # The same wait policy as the in-process worker (evomerge/threads.py says why); a policy the
    # user chose for the driver goes to the actors too.
    env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", WAIT_POLICY)
    return env


def _actor_class():
    import ray

    @ray.remote
    class CandidateActor:
        """A CandidateWorker inside a Ray actor (resident sources on this actor's device)."""

        def __init__(self, space_data: dict, device: str | None, threads: int, verbose: bool):
            import torch

            from evomerge.config.space import SearchSpace
            from evomerge.workers.candidate import CandidateWorker

            torch.set_num_threads(threads)
            space = SearchSpace.model_validate(space_data)
            _check_paths_on_this_node(space)
            self.worker = CandidateWorker(space, device=device, verbose=verbose)

        def evaluate(self, params, split, how):
            return self.worker.evaluate(params, split, **how)

        def item_ids(self, split: str):
            return self.worker.item_ids(split)

        def score_reference(self, name: str, split: str) -> Scores:
            return self.worker.score_reference(name, split)

        def score_reference_items(self, name: str, split: str):
            return self.worker.score_reference_items(name, split)

        def score_reference_margins(self, name: str, split: str, metrics: dict[str, str]):
            return self.worker.score_reference_margins(name, split, metrics)

        def info(self):
            import psutil

            return {
                "name": self.worker.name,
                "rss": psutil.Process().memory_info().rss,
                "sources_bytes": self.worker.builder.sources_bytes,
            }

        def pid(self):
            return os.getpid()

    return CandidateActor


def _check_paths_on_this_node(space: SearchSpace) -> None:
    import socket

    models = [*space.models, *([space.base_model] if space.base_model else [])]
    missing = [str(folder) for m in models for folder in folders_of(m.source) if not folder.is_dir()]
    missing += [str(p) for p in space.eval.include_paths if not p.exists()]
    missing += [p for p in (space.data.include_paths if space.data else ()) if not os.path.exists(p)]
    if missing:
        raise EvomergeError(
            f"node {socket.gethostname()} is missing {', '.join(missing)}: every Ray node needs the models and "
            "task directories at the same absolute paths (or a shared filesystem)"
        )


def space_payload(space: SearchSpace) -> dict:
    """The space as plain data for actors (validated again there; paths already absolute)."""
    data = space.model_dump(mode="json", by_alias=True)
    data["models"] = [m.model_dump(mode="json") for m in space.models]  # name, path and a LoRA adapter's folder
    if space.base_model:
        data["base_model"] = {"name": space.base_model.name, "path": str(space.base_model.path)}
    return data


class RayPool:
    """N Ray actors, each a CandidateWorker with its own resident sources, up to N candidates in flight."""

    def __init__(self, space: SearchSpace, workers: int, *, verbose: bool = False, genome: Genome | None = None):
        address = space.ray.address or os.environ.get("RAY_ADDRESS")
        if not address:
            # Single machine: keep Ray on loopback (dependencies.md: it otherwise binds the
            # machine's external address). Read by ray at import, so also patch the constant.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        if not address:
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False

        from evomerge.genome.kinds import make_genome

        self.space = space
        self._genome = genome or make_genome(space)
        self._started_ray = False
        if not ray.is_initialized():
            init_kwargs: dict[str, Any] = dict(
                namespace=space.ray.namespace,
                include_dashboard=False,
                log_to_driver=verbose,
                configure_logging=True,
                logging_level="WARNING",
                runtime_env={"env_vars": _worker_env()},
            )
            if address:
                init_kwargs["address"] = address
            else:
                init_kwargs["num_cpus"] = max(os.cpu_count() or 1, int(workers * space.ray.num_cpus_per_worker + 0.999))
            ray.init(**init_kwargs)
            self._started_ray = True
        device = (
            resolve_device(space.device)
            if not space.ray.address and not os.environ.get("RAY_ADDRESS")
            else space.device
        )
        gpus = space.ray.num_gpus_per_worker
        if gpus is None:
            gpus = 1.0 if device.startswith("cuda") else 0.0
        actor_device = None if device == "auto" else ("cuda" if device.startswith("cuda") and gpus else device)
        threads = worker_threads(space.ray.num_cpus_per_worker)
        actor = _actor_class().options(
            num_cpus=space.ray.num_cpus_per_worker,
            num_gpus=gpus,
            max_restarts=space.ray.max_restarts,
            max_task_retries=0,  # the loop decides about retries: fail the trial, retry the genome once
        )
        payload = space_payload(space)
        self.actors = [actor.remote(payload, actor_device, threads, verbose) for _ in range(workers)]
        self._idle = list(range(workers))
        self._running: dict[Any, tuple[int, int]] = {}  # ref -> (ticket, actor index)
        self._recovering: dict[Any, int] = {}  # ping ref -> actor index (restarted after a death)
        self._dead: set[int] = set()  # restarts exhausted
        self._parked: list[TrialOutcome] = []  # outcomes collected while waiting for a free actor
        self._ticket = 0
        # Fail fast (one line) if an actor cannot start: missing paths on a node, bad task names...
        self._infos = self._gather_infos()

    def _gather_infos(self) -> list[dict]:
        import ray

        try:
            return ray.get([a.info.remote() for a in self.actors], timeout=1800)
        except ray.exceptions.RayActorError as error:
            cause = getattr(error, "cause", None) or error
            message = str(cause).strip().splitlines()
            detail = next(
                (line for line in reversed(message) if "Error" in line or "error" in line),
                message[-1] if message else "",
            )
            raise EvomergeError(f"a Ray worker failed to start: {detail.strip()}") from None

    @property
    def genome(self) -> Genome:
        return self._genome

    @property
    def size(self) -> int:
        return len(self.actors) - len(self._dead)

    def can_submit(self) -> bool:
        return bool(self._idle)

    def recovering(self) -> bool:
        return bool(self._recovering)

    @property
    def has_selection(self) -> bool:
        return any(o.selection_task for o in self.space.objectives)

    @property
    def worker_infos(self) -> list[dict]:
        return self._infos

    @property
    def name(self) -> str:
        return "ray"

    def submit(self, params: Mapping[str, Any], split: str = "search", **how: Any) -> int:
        if not self._idle:
            raise RuntimeError("no idle worker: wait_any first")
        index = self._idle.pop(0)
        self._ticket += 1
        ref = self.actors[index].evaluate.remote(dict(params), split, how)
        self._running[ref] = (self._ticket, index)
        return self._ticket

    def _recover(self, index: int) -> None:
        """Hold a dead actor out until Ray has restarted it (its __init__ reloads the sources)."""
        self._recovering[self.actors[index].info.remote()] = index

    def _recovered(self, ref) -> None:
        import ray

        index = self._recovering.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # still restarting: ask again shortly
            time.sleep(0.5)
            self._recover(index)
            return
        except ray.exceptions.RayActorError:  # restarts exhausted
            self._dead.add(index)
            if self.size == 0:
                raise EvomergeError("every Ray worker died and could not be restarted (see ray.max_restarts)") from None
            return
        self._idle.append(index)

    def wait_any(self, timeout: float | None = None) -> TrialOutcome | None:
        """The next finished candidate (None when only a worker recovery finished, or on timeout)."""
        import ray

        if self._parked:
            return self._parked.pop(0)
        pending = [*self._running, *self._recovering]
        if not pending:
            return None
        ready, _ = ray.wait(pending, num_returns=1, timeout=timeout)
        if not ready:
            return None
        ref = ready[0]
        if ref in self._recovering:
            self._recovered(ref)
            return None
        ticket, index = self._running.pop(ref)
        try:
            outcome = TrialOutcome(ticket, result=ray.get(ref))
        except ray.exceptions.RayActorError as error:
            self._recover(index)
            return TrialOutcome(ticket, error=RuntimeError(f"worker died: {_first_line(error)}"), worker_died=True)
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            outcome = TrialOutcome(
                ticket, error=cause if isinstance(cause, BaseException) else RuntimeError(_first_line(error))
            )
        except Exception as error:  # object lost, worker crashed...
            self._recover(index)
            return TrialOutcome(ticket, error=RuntimeError(f"worker failed: {_first_line(error)}"), worker_died=True)
        self._idle.append(index)
        return outcome

    def score_reference(self, name: str, split: str) -> Scores:
        """Score a source model on an available actor (waits for one if all are restarting)."""
        return self._on_idle_actor(lambda actor: actor.score_reference.remote(name, split))

    def score_reference_items(self, name: str, split: str) -> tuple[Scores, ItemScores]:
        return self._on_idle_actor(lambda actor: actor.score_reference_items.remote(name, split))

    def score_reference_margins(self, name: str, split: str, metrics: dict[str, str]) -> tuple[Scores, Margins]:
        return self._on_idle_actor(lambda actor: actor.score_reference_margins.remote(name, split, metrics))

    def _on_idle_actor(self, call):
        import ray

        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            while not self._idle and (self._recovering or self._running):
                self._wait_for_idle()
            index = self._idle[0]
            try:
                return ray.get(call(self.actors[index]))
            except ray.exceptions.RayActorError:
                self._idle.remove(index)
                self._recover(index)
        raise EvomergeError("no Ray worker became available to score the reference models")

    def item_ids(self, split: str = "search") -> ItemIds:
        """Every doc id each leaf task scores at full budget, asked of one actor (all load the same tasks)."""
        import ray

        while not self._idle and (self._recovering or self._running):
            self._wait_for_idle()
        return ray.get(self.actors[self._idle[0]].item_ids.remote(split))

    def _wait_for_idle(self) -> None:
        outcome = self.wait_any()
        if outcome is not None:  # a running candidate finished meanwhile: keep it for the loop
            self._parked.append(outcome)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if self._started_ray:
            ray.shutdown()


def _first_line(error: BaseException) -> str:
    for line in str(error).splitlines():
        line = line.strip()
        if line and not line.startswith("ray::"):
            return line[:300]
    return type(error).__name__
