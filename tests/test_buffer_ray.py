"""Several Ray producer actors and one consumer through the buffer actor: nothing lost or repeated."""

import os
from pathlib import Path

import pytest
import ray
from buffer_fixtures import group

from buffer import BufferConfig
from buffer.actor import buffer_actor


@pytest.fixture(scope="module")
def ray_local():
    tests = Path(__file__).parent  # producers import this module's helpers in their own processes
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="test_buffer", runtime_env=env)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Producer:
    def __init__(self, buf, name):
        self.buf, self.name = buf, name

    def run(self, n_groups: int, size: int) -> list[str]:
        ids = []
        for g in range(n_groups):
            members = group(f"{self.name}-{g}", size, version=0)
            ray.get(self.buf.put_many.remote(members, timeout=30))  # blocks while the buffer is full
            ids += [t.traj_id for t in members]
        return ids


def test_many_producers_one_consumer(ray_local):
    buf = buffer_actor(BufferConfig(capacity=24, max_staleness=10))
    producers = [Producer.remote(buf, f"p{i}") for i in range(3)]
    runs = [p.run.remote(20, 4) for p in producers]  # 240 trajectories through a 24-slot buffer
    got = []
    while len(got) < 240:
        batch = ray.get(buf.get_batch.remote(2, 0, timeout=30))
        assert batch is not None, "producers stalled"
        assert all(
            sum(t.group_id == g for t in batch.trajectories) == 4 for g in {t.group_id for t in batch.trajectories}
        )
        got += [t.traj_id for t in batch.trajectories]
    sent = [i for ids in ray.get(runs) for i in ids]
    assert sorted(got) == sorted(sent) and len(set(got)) == 240
    metrics = ray.get(buf.metrics.remote())
    assert metrics["buffer/held"] == 0 and metrics["buffer/put_wait_s"] > 0  # backpressure happened
