"""Learner -> rollout weight updates over a real weight group, under ZeRO-2 and ZeRO-3.

The receiver is a transformers model in its own Ray actor (the rollout side's fallback
engine loads weights the same way); after one training step and an update its weights must
be bit-identical to the learner's. Receivers on the learner's node read a shared-memory region
(weightsync/shm.py), the others the gloo broadcast; a group can mix both, and the real vLLM
engine loads from the region.
"""

from __future__ import annotations

import os

import pytest
import ray
import torch
from learner_fixtures import save_tiny_llama, synthetic_trajectories
from rollout_fixtures import load_model, model_dir, random_weights, reference_logprobs

from learner.config import LearnerConfig
from learner.group import LearnerGroup
from rollout.actor import rollout_actor
from rollout.config import RolloutConfig
from rollout.records import PromptItem
from runtime.rendezvous import AuthStore, RendezvousError
from weightsync.sender import WeightBroadcaster
from weightsync.shm import NAME_PREFIX, SHM_DIR, ShmRegion
from weightsync.transport import plan_to_wire


def region_maps() -> int:
    """Mappings of weight regions in this process (unlinked ones show as "(deleted)")."""
    with open("/proc/self/maps") as f:
        return sum(NAME_PREFIX in line for line in f)


def region_files() -> set[str]:
    return {f for f in os.listdir(SHM_DIR) if f.startswith(NAME_PREFIX)}


@ray.remote(num_cpus=0)
class ModelReceiver:
    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def join(self, host: str, port: int, rank: int, world_size: int, secret: str) -> bool:
        """True when this receiver reads rank 0's shared region, False when it gets the broadcast."""
        from weightsync.transport import open_group

        self.group = open_group(host, port, rank, world_size, "gloo", secret)
        return self.group.local is not None

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

    def region_maps(self) -> int:
        from weightsync.shm import NAME_PREFIX  # actor methods reach nothing of this module's

        with open("/proc/self/maps") as f:
            return sum(NAME_PREFIX in line for line in f)

    def close(self) -> None:
        self.group.close()


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="test_weight_sync")
    yield
    ray.shutdown()


@pytest.mark.parametrize("zero_stage,shm", [(2, False), (3, True)])
def test_broadcast_leaves_receivers_bit_identical(ray_cluster, tmp_path, zero_stage, shm):
    """`learner.weight_sync_shm` picks the path for receivers on the learner's node."""
    model_dir = save_tiny_llama(tmp_path / "model")
    cfg = LearnerConfig(model_path=model_dir, world_size=2, zero_stage=zero_stage, lr=1e-2, weight_sync_shm=shm)
    group = LearnerGroup(cfg)
    receivers = [ModelReceiver.remote(model_dir) for _ in range(2)]
    try:
        group.train_step(group.make_batch(synthetic_trajectories()))
        host, port, secret = group.open_weight_sync(num_receivers=2, bucket_bytes=64 << 10)  # many small buckets
        joins = [r.join.remote(host, port, i + 1, 3, secret) for i, r in enumerate(receivers)]
        local = ray.get([group.connect_weight_sync(), *joins])[1:]
        plan = group.weight_plan()
        assert len(plan) > 1
        received = [r.receive.remote(plan) for r in receivers]
        stats = [s for s in ray.get(group.broadcast_weights(plan)) if s]
        counts = ray.get(received)
        learner_weights = group.full_state_dict()
        states = ray.get([r.state.remote() for r in receivers])
    finally:
        group.shutdown()
    assert local == [shm, shm]
    assert counts == [len(learner_weights)] * 2
    initial = ray.get(ModelReceiver.remote(model_dir).state.remote())
    assert any(not torch.equal(initial[k], v) for k, v in learner_weights.items())  # the step changed weights
    for state in states:
        for name, value in learner_weights.items():
            assert torch.equal(state[name], value), name
    assert stats[0]["sync/bytes"] == sum(v.numel() * v.element_size() for v in learner_weights.values())


def test_a_mixed_group_gets_identical_weights_and_leaves_no_region(ray_cluster, tmp_path):
    """Rank 1 reads the shared region, rank 2 is treated as on another node (broadcast); two
    updates of different weights (the second reuses the region), and the region's name is gone
    from /dev/shm while the group lives, its mappings gone after close."""
    path = save_tiny_llama(tmp_path / "model")
    before = region_files()
    bc = WeightBroadcaster(2, bucket_bytes=64 << 10, device=torch.device("cpu"), host="127.0.0.1", same_node={1})
    receivers = [ModelReceiver.remote(path) for _ in range(2)]
    joins = [r.join.remote(bc.host, bc.port, i + 1, 3, bc.secret) for i, r in enumerate(receivers)]
    bc.connect()
    assert ray.get(joins) == [True, False]
    try:
        for seed in (1, 2):
            weights = random_weights(path, seed)
            plan = bc.plan(weights.items())
            received = [r.receive.remote(plan_to_wire(plan)) for r in receivers]
            bc.broadcast(weights.items(), plan)
            assert ray.get(received) == [len(weights)] * 2
            for state in ray.get([r.state.remote() for r in receivers]):
                assert all(torch.equal(state[k], v) for k, v in weights.items())
        assert region_files() == before  # unlinked once mapped
        assert region_maps() == 1 and ray.get([r.region_maps.remote() for r in receivers]) == [1, 0]
    finally:
        bc.close()
        ray.get([r.close.remote() for r in receivers])
    assert region_maps() == 0 and ray.get([r.region_maps.remote() for r in receivers]) == [0, 0]
    assert region_files() == before


def test_only_members_learn_where_the_region_is(ray_cluster, tmp_path):
    """The region's handle travels through the group's store: a member reads it, a process
    without the group's secret cannot connect to ask. The region itself is private (0600)."""
    bc = WeightBroadcaster(1, device=torch.device("cpu"), host="127.0.0.1")
    receiver = ModelReceiver.remote(save_tiny_llama(tmp_path / "model"))
    join = receiver.join.remote(bc.host, bc.port, 1, 2, bc.secret)
    bc.connect()
    assert ray.get(join)
    try:
        member = AuthStore(bc.host, bc.port, bytes.fromhex(bc.secret), name="weight group")
        assert NAME_PREFIX in member.get("vespo-weights-local/offer").decode()
        with pytest.raises(RendezvousError):
            AuthStore(bc.host, bc.port, bytes.fromhex("00" * 32), name="weight group").get("vespo-weights-local/offer")
        assert bc.refused[0] >= 1
    finally:
        bc.close()
        ray.get(receiver.close.remote())
    region = ShmRegion.create(1 << 16, torch.device("cpu"))
    try:
        assert os.stat(region.path).st_mode & 0o777 == 0o600
        assert len(os.path.basename(region.path)) == len(NAME_PREFIX) + 32  # 128 random bits
    finally:
        region.close()
    assert not os.path.exists(region.path)


def test_real_vllm_loads_from_the_region_beside_a_broadcast_receiver(ray_cluster):
    """The vLLM engine (rank 1, same node) loads an update from shared memory while a transformers
    receiver (rank 2, treated as remote) gets the broadcast: both end with the sent weights.
    Overwriting the region afterwards changes nothing in the engine: it copied what it read."""
    path = model_dir()
    cfg = RolloutConfig(model_path=path, n=2, max_new_tokens=24, max_model_len=128, num_cpus=1, dtype="float32")
    actor = rollout_actor(cfg)
    ray.get(actor.start.remote())
    other = ModelReceiver.remote(path)
    try:
        bc = WeightBroadcaster(2, bucket_bytes=256 << 10, device=torch.device("cpu"), host="127.0.0.1", same_node={1})
        joins = [actor.init_weight_group.remote(bc.host, bc.port, 1, 3, "gloo", bc.secret),
                 other.join.remote(bc.host, bc.port, 2, 3, bc.secret)]  # fmt: skip
        bc.connect()
        assert ray.get(joins)[1] is False and bc.group.local is not None and bc.group.remote is not None
        weights = random_weights(path, seed=3)
        plan = bc.plan(weights.items())
        refs = [actor.receive_weights.remote(plan_to_wire(plan), 1), other.receive.remote(plan_to_wire(plan))]
        bc.broadcast(weights.items(), plan)
        out, count = ray.get(refs)
        assert out["version"] == 1 and count == len(weights)
        bc.group.local.region.buffer.zero_()  # the engine must not be reading the region any more
        names = ["model.embed_tokens.weight", "lm_head.weight"]
        got = ray.get(actor.weights.remote(names))
        vocab = weights["lm_head.weight"].shape[0]  # vLLM pads the vocabulary rows
        assert all(torch.equal(got[n][:vocab], weights[n]) for n in names)
        assert all(torch.equal(v, weights[k]) for k, v in ray.get(other.state.remote()).items())
        # linear layers are repacked on CPU (their parameters read empty): log-probs check them
        result = ray.get(actor.generate.remote([PromptItem("p", "3+4=", answer="7", sample_id="0")]))
        model = load_model(path, weights)
        for t in result.trajectories:
            ref = reference_logprobs(model, t.prompt_ids, t.response_ids)
            assert (ref - torch.tensor(t.behavior_logprobs)).abs().max().item() < 1e-3
        bc.close()
    finally:
        ray.get(actor.shutdown.remote())
        ray.kill(actor)
