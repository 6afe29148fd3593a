"""Replay-buffer throughput: put + get of 1k-token trajectories, in-process and through a Ray
actor fed by 4 producer actors, each against a bare queue.Queue of the same records.

Run: .venv/bin/python -m bench.buffer [--trajectories 40000]
"""

from __future__ import annotations

import argparse
import queue
import time

import numpy as np
import ray

from buffer import BufferConfig, ReplayBuffer, Trajectory, columnar
from buffer.actor import buffer_actor, unpack_batch

GROUP = 8
CHUNK = 256  # trajectories per put_many call
GROUPS_PER_GET = 32


def make(n: int, prefix: str = "", tokens: int = 1024) -> list[Trajectory]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32000, tokens).astype(np.int32)
    lps = -rng.random(tokens).astype(np.float32)
    versions = np.zeros(tokens, np.int32)
    return [
        Trajectory(f"{prefix}{i}", f"{prefix}g{i // GROUP}", GROUP, ids[:128], ids, lps, versions, 0, 0)
        for i in range(n)
    ]


def in_process(trajs: list[Trajectory]) -> float:
    buf = ReplayBuffer(BufferConfig(capacity=len(trajs), max_staleness=4))
    start = time.perf_counter()
    got = 0
    for i in range(0, len(trajs), CHUNK):
        buf.put_many(trajs[i : i + CHUNK])
        while (batch := buf.get_batch(GROUPS_PER_GET, 0)) is not None:
            got += len(batch.trajectories)
    while (batch := buf.get_batch(1, 0)) is not None:
        got += len(batch.trajectories)
    assert got == len(trajs)
    return len(trajs) / (time.perf_counter() - start)


def bare_queue(trajs: list[Trajectory]) -> float:
    q: queue.Queue = queue.Queue()
    start = time.perf_counter()
    for t in trajs:
        q.put(t)
    for _ in trajs:
        q.get()
    return len(trajs) / (time.perf_counter() - start)


@ray.remote(num_cpus=0)
class Producer:
    def __init__(self, n: int, prefix: str):
        self.trajs = make(n, prefix)

    def run(self, buf) -> int:
        for i in range(0, len(self.trajs), CHUNK):
            ray.get(buf.put_packed.remote(columnar.pack(self.trajs[i : i + CHUNK]), timeout=60))
        return len(self.trajs)


def through_ray(n_total: int, producers: int = 4) -> float:
    buf = buffer_actor(BufferConfig(capacity=8192, max_staleness=4))
    workers = [Producer.remote(n_total // producers, f"p{i}-") for i in range(producers)]
    ray.get([w.__ray_ready__.remote() for w in workers])
    start = time.perf_counter()
    runs = [w.run.remote(buf) for w in workers]
    got = 0
    while got < n_total:
        batch = unpack_batch(ray.get(buf.get_batch_packed.remote(GROUPS_PER_GET, 0, timeout=60)))
        got += len(batch.trajectories)
    ray.get(runs)
    return n_total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=40960)
    args = parser.parse_args()
    trajs = make(args.trajectories)
    base = bare_queue(trajs)
    local = in_process(trajs)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    remote = through_ray(args.trajectories)
    ray.shutdown()
    print(f"{args.trajectories} trajectories of 1024 response tokens, groups of {GROUP}, put_many of {CHUNK}")
    print(f"{'path':<34} {'trajectories/s':>15} {'vs queue.Queue':>15}")
    print(f"{'queue.Queue (put all, get all)':<34} {base:>15,.0f} {1.0:>14.2f}x")
    print(f"{'ReplayBuffer in-process':<34} {local:>15,.0f} {local / base:>14.2f}x")
    print(f"{'Ray actor, 4 producer actors':<34} {remote:>15,.0f} {remote / base:>14.2f}x")


if __name__ == "__main__":
    main()
