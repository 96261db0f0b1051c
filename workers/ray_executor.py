"""The Ray layer: long-lived actors, one per model copy; units stream through them.

An actor loads its weights once, in its constructor, so that Ray can restart it (a killed worker
process) and retry the unit it was running on the new process. GPUs are Ray resources taken from
detection (0 on a machine without one, so nothing waits forever for a GPU that is not there):
a fraction of a GPU packs small models, more than one spreads a model with `device_map="auto"`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from atlas.errors import AtlasError
from workers.models import LoadedModel, ModelSource, load
from workers.plan import Unit
from workers.unit import UnitResult, run_unit

PASS_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HEAD_ATLAS_CACHE", "TRANSFORMERS_OFFLINE", "HEAD_ATLAS_FAMILIES",
            "PYTHONPATH")
MAX_RESTARTS = 3  # a killed actor comes back this many times; its running unit is retried on it


class ModelActor:
    def __init__(self, source: ModelSource, device: str, options: dict[str, Any], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # Ray pins OMP threads to the actor's CPUs; be explicit
        self.error: Exception | None = None
        self.lm: LoadedModel | None = None
        try:
            self.lm = load(source, device, **options)
        except Exception as exc:  # kept and raised from ready(), so the driver sees a clear error
            self.error = exc

    def _loaded(self) -> LoadedModel:
        if self.lm is None:
            raise self.error or RuntimeError("the model was not loaded")
        return self.lm

    def ready(self) -> dict[str, Any]:
        return self._loaded().models_row()

    def pid(self) -> int:
        return os.getpid()

    def run_unit(self, unit: Unit, shard_root: str) -> UnitResult:
        return run_unit(self._loaded(), unit, shard_root)


def _unwrap(exc: Exception) -> Exception:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, AtlasError) else exc


def ensure_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "runtime_env": {"env_vars": env}}
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(num_cpus=os.cpu_count() or 1, object_store_memory=200 * 2**20)
    ray.init(**kwargs)


class RayExecutor:
    def __init__(self, address: str | None = None, device: str = "auto",
                 load_options: dict[str, Any] | None = None, replicas: int = 1,
                 gpus_per_actor: float | None = None, cpus_per_actor: int | None = None) -> None:
        ensure_ray(address)
        self.load_options = dict(load_options or {})
        gpus = ray.cluster_resources().get("GPU", 0)
        self.device = ("cuda" if gpus else "cpu") if device == "auto" else device
        self.num_gpus = (gpus_per_actor if gpus_per_actor is not None else 1) if self.device == "cuda" else 0
        if self.num_gpus > 1:
            self.load_options["device_map"] = "auto"
        self.replicas = max(1, replicas)
        self.cpus_per_actor = cpus_per_actor
        self.actors: list[Any] = []

    def _spawn(self, source: ModelSource, cpus: int) -> Any:
        actor_cls = ray.remote(ModelActor).options(num_cpus=cpus, num_gpus=self.num_gpus,
                                                   max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
        # Any, like self.actors: ray types an actor's methods as plain callables, without .remote
        actor: Any = actor_cls.remote(source, self.device, self.load_options, cpus)
        try:
            ray.get(actor.ready.remote())
        except ray.exceptions.RayError as exc:
            ray.kill(actor)
            raise _unwrap(exc) from None
        self.actors.append(actor)
        return actor

    def run(self, units: list[Unit], shard_root: Path, started: Any = None) -> Iterator[UnitResult]:
        queues: dict[str, deque[Unit]] = {}
        sources: dict[str, ModelSource] = {}
        for unit in units:
            queues.setdefault(unit.source.key, deque()).append(unit)
            sources[unit.source.key] = unit.source
        n_actors = sum(min(self.replicas, len(q)) for q in queues.values())
        cpus = self.cpus_per_actor or max(1, int(ray.cluster_resources().get("CPU", 1)) // n_actors)
        pending: dict[Any, tuple[Any, Unit]] = {}

        def dispatch(actor: Any, key: str) -> None:
            if queues[key]:
                unit = queues[key].popleft()
                pending[actor.run_unit.remote(unit, str(shard_root))] = (actor, unit)
                if started:  # one unit at a time per actor: dispatched is started
                    started(unit)

        for key, queue in queues.items():
            for _ in range(min(self.replicas, len(queue))):
                dispatch(self._spawn(sources[key], cpus), key)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            actor, unit = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayActorError as exc:  # died more often than it may restart
                result = UnitResult(unit.run_id, False, error=f"worker died: {exc}")
                actor = self._spawn(unit.source, cpus)
            yield result
            dispatch(actor, unit.source.key)

    def actor_pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors.clear()
