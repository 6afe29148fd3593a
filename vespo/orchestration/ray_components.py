"""The real components behind vespo.orchestration.contracts: Ray actors, and Ray's errors in
the loop's terms. Starting Ray itself is `ray_start`.

An engine call that fails because its actor is gone (for now: Ray restarts it) becomes
EngineDown; one whose actor will not come back becomes EngineLost. Everything else (a learner
rank's failure, a bug) passes through unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from buffer.actor import buffer_actor, unpack_batch
from buffer.replay import Batch
from learner.group import LearnerGroup
from rollout.actor import EngineNotStarted, rollout_actor
from rollout.records import PromptItem, RolloutResult
from vespo.config.placement import (
    assign_cores,
    role_options,  # fmt: skip
)
from vespo.orchestration.contracts import EngineDown, EngineLost
from vespo.orchestration.ray_start import check_resources, init_ray
from weightsync.transport import node_ip

log = logging.getLogger(__name__)

_GONE = (ray.exceptions.RayActorError, EngineNotStarted)


def _engine_error(err: BaseException) -> BaseException:
    if isinstance(err, ray.exceptions.ActorDiedError):
        return EngineLost(str(err).splitlines()[0])
    if isinstance(err, _GONE):
        return EngineDown(f"{type(err).__name__}: {str(err).splitlines()[0]}")
    return err


class RayPending:
    """A Ray call under way; `engine=True` translates an engine actor's death."""

    def __init__(self, refs: Any, engine: bool = False):
        self.refs, self.engine = refs, engine

    def result(self, timeout: float | None = None) -> Any:
        try:
            return ray.get(self.refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise
        except BaseException as err:
            if not self.engine:
                raise
            translated = _engine_error(err)
            if translated is err:
                raise
            raise translated from err


class RayEngine:
    """One rollout actor (rollout.actor.RolloutActor: vLLM, or the transformers fallback)."""

    def __init__(self, actor, name: str):
        self.actor, self.name = actor, name

    def _call(self, method: str, *args) -> Any:
        return RayPending(getattr(self.actor, method).remote(*args), engine=True).result()

    def start(self) -> RayPending:
        return RayPending(self.actor.start.remote(), engine=True)

    def restart(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.get(self.actor.get_stats.remote(), timeout=30)  # returns once the actor is back
                break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as err:
                if time.monotonic() > deadline:
                    limit = f"train.engine_restart_timeout_s={timeout_s}"
                    raise EngineLost(f"{self.name} was not back within {limit}") from err
                time.sleep(1)
            except ray.exceptions.ActorDiedError as err:
                raise EngineLost(str(err).splitlines()[0]) from err
        return self._call("start")

    def poll(self) -> tuple[int, list]:
        return self._call("poll")

    def submit(self, items: list[PromptItem]) -> None:
        self.actor.submit.remote(items)  # fire and forget: a death shows in the next poll

    def generate(self, items: list[PromptItem], n: int | None = None) -> RolloutResult:
        return self._call("generate", items, n)

    def set_buffer(self, buffer: RayBuffer) -> None:
        self._call("set_buffer", buffer.actor)

    def join_weight_group(self, host: str, port: int, offset: int, world: int, backend: str, secret: str):
        return RayPending(self.actor.init_weight_group.remote(host, port, offset, world, backend, secret), True)

    def receive_weights(self, plan: list, version: int) -> RayPending:
        return RayPending(self.actor.receive_weights.remote(plan, version), engine=True)

    def stats(self):
        return self._call("get_stats")

    def drain(self) -> None:
        self._call("drain")

    def shutdown(self) -> None:
        try:
            ray.get(self.actor.shutdown.remote(), timeout=30)
        finally:
            ray.kill(self.actor)


class RayBuffer:
    """The replay-buffer actor; batches travel packed (buffer.columnar), far fewer objects."""

    def __init__(self, actor):
        self.actor = actor

    def admit(self, current_version: int, wanted: int) -> int:
        return ray.get(self.actor.admit.remote(current_version, wanted))

    def abandon(self, n_groups: int) -> None:
        ray.get(self.actor.abandon.remote(n_groups))

    def get_batch(self, n_groups: int, current_version: int, timeout: float | None = 0.0,
                  at_least: int | None = None) -> Batch | None:  # fmt: skip
        return unpack_batch(ray.get(self.actor.get_batch_packed.remote(n_groups, current_version, timeout, at_least)))

    def seen_groups(self, group_ids: list[str]) -> list[str]:
        return ray.get(self.actor.seen_groups.remote(group_ids))

    def snapshot_seen_groups(self, directory: str | Path) -> list[str]:
        return ray.get(self.actor.snapshot_seen_groups.remote(str(directory)))

    def metrics(self) -> dict[str, float]:
        return ray.get(self.actor.metrics.remote())

    def set_staleness_cap(self, cap: int | None) -> None:
        ray.get(self.actor.set_staleness_cap.remote(cap))

    def shutdown(self) -> None:
        ray.kill(self.actor)


class RayLearner(LearnerGroup):
    """The DeepSpeed learner group, its asynchronous calls as Pending."""

    def connect_weight_sync(self) -> RayPending:
        return RayPending(super().connect_weight_sync())

    def broadcast_weights(self, wire_plan: list) -> RayPending:
        return RayPending(super().broadcast_weights(wire_plan))


@dataclass
class CoreChoice:
    """Who runs on which cores (all empty: nothing pinned)."""

    engines: list[list[int]] = field(default_factory=list)
    ranks: list[list[int]] = field(default_factory=list)
    # the driver (controller) and the buffer actor: every core but the learner ranks'. Ranks
    # wait on each other in every collective, so a rank slowed by a neighbour slows the step.
    driver: list[int] = field(default_factory=list)


def start_actors(cfg, restore_buffer: str | None = None) -> tuple[list[RayEngine], RayBuffer, CoreChoice]:
    """Ray first (or the cluster the config names), the layout checked against it, then the
    buffer and the engine actors (their engines are started by the caller, all at once).
    Returns the cores chosen too, for start_learner and the driver."""
    init_ray(cfg)
    check_resources(cfg)
    cores = choose_cores(cfg)
    resources = ray.cluster_resources()
    buffer = RayBuffer(buffer_actor(cfg.buffer, restore_from=restore_buffer, cores=cores.driver or None))
    engines = [RayEngine(rollout_actor(cfg.rollout, cfg.task, f"engine-{i}", buffer.actor,
                                       cores=cores.engines[i] if cores.engines else None,
                                       **role_options(resources, "rollout")), f"engine-{i}")
               for i in range(cfg.train.num_engines)]  # fmt: skip
    return engines, buffer, cores


def choose_cores(cfg) -> CoreChoice:
    """Each engine's and learner rank's cores: the config's (rollout.cpu_cores, learner.cpu_cores),
    else, with train.pin_cores on a one-machine CPU cluster (the driver's: the only case
    where one process sees every actor's cores), disjoint ones from placement.assign_cores,
    and the rest for the driver and the buffer. Never written back into the config: a resumed
    run on another machine chooses its own. On GPU nodes each role already has its own
    devices (Ray's GPU accounting)."""
    if not cfg.train.pin_cores or cfg.rollout.cpu_cores or cfg.learner.cpu_cores:
        return CoreChoice(cfg.rollout.cpu_cores, cfg.learner.cpu_cores)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) != 1 or alive[0]["Resources"].get("GPU") or alive[0]["NodeManagerAddress"] != node_ip():
        return CoreChoice()
    mine = sorted(os.sched_getaffinity(0))
    got = assign_cores(mine, cfg.train.num_engines, cfg.rollout.num_cpus, cfg.learner.world_size,
                       cfg.learner.num_cpus_per_worker)  # fmt: skip
    if isinstance(got, str):
        log.warning("cores not pinned (engines and learner ranks share them): %s", got)
        return CoreChoice()
    ranks = {c for cores in got[1] for c in cores}
    choice = CoreChoice(got[0], got[1], [c for c in mine if c not in ranks])
    log.info("cores: engines %s, learner ranks %s, driver and buffer %s", choice.engines, choice.ranks, choice.driver)
    return choice


def start_learner(cfg, rank_cores: list[list[int]] | None = None) -> RayLearner:
    learner_cfg = dataclasses.replace(cfg.learner, cpu_cores=rank_cores) if rank_cores else cfg.learner
    return RayLearner(learner_cfg, role_options(ray.cluster_resources(), "learner").get("resources"))


def new_buffer(cfg) -> RayBuffer:
    return RayBuffer(buffer_actor(cfg.buffer))
