"""Learner -> rollout weight broadcast over a real gloo weight group, under ZeRO-2 and ZeRO-3.

The receiver is a transformers model in its own Ray actor (the rollout side's fallback
engine loads weights the same way); after one training step and a broadcast its weights must
be bit-identical to the learner's.
"""

from __future__ import annotations

import pytest
import ray
import torch
from learner_fixtures import save_tiny_llama, synthetic_trajectories

from learner.config import LearnerConfig
from learner.group import LearnerGroup


@ray.remote(num_cpus=0)
class ModelReceiver:
    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def join(self, host: str, port: int, rank: int, world_size: int, secret: str) -> None:
        from weightsync.transport import open_group

        self.group = open_group(host, port, rank, world_size, "gloo", secret)

    def receive(self, wire_plan: list) -> int:
        from weightsync.transport import plan_from_wire, receive

        params = dict(self.model.named_parameters())
        n = 0
        with torch.no_grad():
            for bucket in receive(self.group, plan_from_wire(wire_plan), torch.device("cpu")):
                for name, tensor in bucket:
                    params[name].copy_(tensor)
                    n += 1
        return n

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="test_weight_sync")
    yield
    ray.shutdown()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_broadcast_leaves_receivers_bit_identical(ray_cluster, tmp_path, zero_stage):
    model_dir = save_tiny_llama(tmp_path / "model")
    group = LearnerGroup(LearnerConfig(model_path=model_dir, world_size=2, zero_stage=zero_stage, lr=1e-2))
    receivers = [ModelReceiver.remote(model_dir) for _ in range(2)]
    try:
        group.train_step(group.make_batch(synthetic_trajectories()))
        host, port, secret = group.open_weight_sync(num_receivers=2, bucket_bytes=64 << 10)  # many small buckets
        joins = [r.join.remote(host, port, i + 1, 3, secret) for i, r in enumerate(receivers)]
        ray.get([group.connect_weight_sync(), *joins])
        plan = group.weight_plan()
        assert len(plan) > 1
        received = [r.receive.remote(plan) for r in receivers]
        stats = [s for s in ray.get(group.broadcast_weights(plan)) if s]
        counts = ray.get(received)
        learner_weights = group.full_state_dict()
        states = ray.get([r.state.remote() for r in receivers])
    finally:
        group.shutdown()
    assert counts == [len(learner_weights)] * 2
    initial = ray.get(ModelReceiver.remote(model_dir).state.remote())
    assert any(not torch.equal(initial[k], v) for k, v in learner_weights.items())  # the step changed weights
    for state in states:
        for name, value in learner_weights.items():
            assert torch.equal(state[name], value), name
    assert stats[0]["sync/bytes"] == sum(v.numel() * v.element_size() for v in learner_weights.values())
