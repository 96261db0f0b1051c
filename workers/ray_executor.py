"""The Ray layer: one long-lived actor per model copy; units stream through it.

The actor loads weights once. GPUs are Ray resources taken from detection (0 on a machine
without one, so nothing waits forever for a GPU that is not there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from atlas.errors import AtlasError
from workers.models import ModelSource, load
from workers.plan import Unit
from workers.unit import UnitResult, run_unit

PASS_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HEAD_ATLAS_CACHE", "TRANSFORMERS_OFFLINE")


class ModelActor:
    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # Ray sets OMP threads to the actor's CPUs; be explicit
        self.lm = None

    def load(self, source: ModelSource, device: str, options: dict[str, Any]) -> dict[str, Any]:
        self.lm = load(source, device, **options)
        return self.lm.models_row()

    def run_unit(self, unit: Unit, shard_root: str) -> UnitResult:
        return run_unit(self.lm, unit, shard_root)


def _unwrap(exc: Exception) -> Exception:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, AtlasError) else exc


class RayExecutor:
    def __init__(self, address: str | None = None, device: str = "auto",
                 load_options: dict[str, Any] | None = None, cpus_per_actor: int | None = None) -> None:
        if not ray.is_initialized():
            env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "runtime_env": {"env_vars": env}}
            if address:
                kwargs["address"] = address
            else:
                kwargs.update(num_cpus=os.cpu_count() or 1, object_store_memory=200 * 2**20)
            ray.init(**kwargs)
        self.load_options = load_options or {}
        gpus = ray.cluster_resources().get("GPU", 0)
        self.device = ("cuda" if gpus else "cpu") if device == "auto" else device
        self.num_gpus = 1 if self.device == "cuda" else 0
        self.cpus = cpus_per_actor or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.actors: dict[str, Any] = {}

    def _actor(self, source: ModelSource) -> Any:
        if source.key not in self.actors:
            actor_cls = ray.remote(num_cpus=self.cpus, num_gpus=self.num_gpus)(ModelActor)
            actor = actor_cls.remote(self.cpus)
            try:
                ray.get(actor.load.remote(source, self.device, self.load_options))
            except ray.exceptions.RayError as exc:
                raise _unwrap(exc) from None
            self.actors[source.key] = actor
        return self.actors[source.key]

    def run(self, units: list[Unit], shard_root: Path) -> Iterator[UnitResult]:
        pending = {self._actor(u.source).run_unit.remote(u, str(shard_root)): u for u in units}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                yield ray.get(ref)

    def close(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
