"""The replay buffer as a Ray actor: the same object, with threads so a waiting get_batch
does not block producers' puts (the buffer's condition variable does the waiting)."""

from __future__ import annotations

import ray

from buffer import columnar
from buffer.config import BufferConfig
from buffer.replay import Batch, ReplayBuffer
from runtime.cores import bind_threads


def buffer_actor(cfg: BufferConfig | None = None, restore_from: str | None = None, cores: list[int] | None = None,
                 **options):  # fmt: skip
    """A ReplayBuffer actor handle (restored from a snapshot directory when given); `cores`:
    the ones it may run on (kept off the learner ranks' cores, which every step waits for)."""
    actor = ray.remote(num_cpus=0, max_concurrency=32)(_BufferActor)
    return actor.options(**options).remote(cfg, restore_from, cores)


class _BufferActor(ReplayBuffer):
    """Adds packed variants of put_many/get_batch (buffer.columnar): far fewer objects to
    serialise per call, which is what bounds throughput through Ray."""

    def __init__(self, cfg: BufferConfig | None, restore_from: str | None, cores: list[int] | None = None):
        if cores:
            bind_threads(cores)
        super().__init__(cfg)
        if restore_from:
            restored = ReplayBuffer.restore(restore_from, cfg)
            self._state, self._counters, self._last_staleness, self._dynamic_cap = (
                restored._state,
                restored._counters,
                restored._last_staleness,
                restored._dynamic_cap,
            )

    def put_packed(self, payload: dict, timeout: float | None = 0.0) -> None:
        self.put_many(columnar.unpack(payload), timeout)

    def get_batch_packed(
        self, n_groups: int, current_version: int, timeout: float | None = 0.0, at_least: int | None = None
    ) -> dict | None:
        batch = self.get_batch(n_groups, current_version, timeout, at_least)
        if batch is None:
            return None
        return {"trajectories": columnar.pack(batch.trajectories), "weights": batch.weights,
                "staleness": batch.staleness, "version": batch.version}  # fmt: skip


def unpack_batch(payload: dict | None) -> Batch | None:
    """The Batch a get_batch_packed call returned."""
    if payload is None:
        return None
    trajs = columnar.unpack(payload["trajectories"])
    return Batch(trajs, payload["weights"], payload["staleness"], payload["version"])
