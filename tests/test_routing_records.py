"""MoE routing as the engine recorded it travels with each trajectory: through msgpack (snapshots,
transport), the columnar batches the buffer hands out, collation and packing, arriving aligned
with the tokens the learner runs, and absent for a dense model."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from buffer.columnar import pack as pack_columns
from buffer.columnar import unpack as unpack_columns
from buffer.trajectory import Trajectory
from learner.batching import collate
from learner.packing import micro_batches_of

LAYERS, TOP_K = 3, 2


def trajectory(i: int, prompt: int, response: int, routed: bool = True) -> Trajectory:
    rng = np.random.default_rng(i)
    ran = prompt + response - 1  # the last sampled token never ran through the engine's model
    return Trajectory(
        traj_id=f"g{i}/0", group_id=f"g{i}", group_size=1,
        prompt_ids=rng.integers(5, 50, prompt), response_ids=rng.integers(5, 50, response),
        behavior_logprobs=-rng.random(response), token_versions=np.zeros(response),
        version_start=0, version_end=0,
        routed_experts=rng.integers(0, 8, ran * LAYERS * TOP_K) if routed else None,
        routing_shape=(LAYERS, TOP_K) if routed else (0, 0),
    )  # fmt: skip


def test_routing_survives_msgpack_columns_and_old_snapshots():
    t = trajectory(0, 4, 6)
    assert t.routing().shape == (9, LAYERS, TOP_K) and t.routed_experts.dtype == np.uint8
    back = Trajectory.from_bytes(t.to_bytes())
    assert np.array_equal(back.routing(), t.routing()) and back.routing_shape == (LAYERS, TOP_K)
    dense = trajectory(1, 3, 2, routed=False)
    columns = unpack_columns(pack_columns([t, dense]))
    assert np.array_equal(columns[0].routing(), t.routing()) and columns[1].routing() is None
    old = msgpack.unpackb(dense.to_bytes(), raw=False)
    del old["routed_experts"], old["routing_shape"]  # a snapshot written before routing existed
    assert Trajectory.from_dict(old).routing() is None


def test_routing_of_the_wrong_length_is_refused():
    good = trajectory(0, 4, 6)
    with pytest.raises(ValueError, match="54 routed-expert entries, expected 48 .8 tokens x 3 layers x top-2"):
        Trajectory(**{**good.__dict__, "routed_experts": good.routed_experts, "response_ids": good.response_ids[:5],
                      "behavior_logprobs": good.behavior_logprobs[:5], "token_versions": good.token_versions[:5],
                      "loss_mask": None})  # fmt: skip


def test_collated_and_packed_routing_sit_on_their_tokens():
    trajs = [trajectory(0, 4, 6), trajectory(1, 3, 2, routed=False), trajectory(2, 5, 3), trajectory(3, 2, 2)]
    for i, t in enumerate(trajs):
        t.prompt_ids[0] = 100 + i  # each sequence's first token names it
    batch = collate(trajs, np.zeros(len(trajs)))
    assert batch.routed_experts.shape == (4, 10, LAYERS, TOP_K) and batch.routed_experts.dtype == torch.int16
    assert torch.equal(batch.routed_experts[0, :9], torch.from_numpy(trajs[0].routing().astype(np.int16)))
    assert (batch.routed_experts[0, 9:] == -1).all() and (batch.routed_experts[1] == -1).all()
    checked = set()
    for _, micro, packed in micro_batches_of(batch, token_budget=20, packed=True):
        assert micro.routed_experts.shape[1] == micro.input_ids.shape[1]
        ids, pos, routed = packed.input_ids, packed.position_ids, packed.routed_experts
        for r in range(ids.shape[0]):
            for c in (pos[r] == 0).nonzero().flatten().tolist():
                if int(ids[r, c]) < 100:
                    assert (routed[r, c:] == -1).all()  # the row's tail
                    continue
                t = trajs[int(ids[r, c]) - 100]
                expected = torch.full((t.num_tokens, LAYERS, TOP_K), -1, dtype=torch.int16)
                if t.routing() is not None:
                    expected[: t.num_tokens - 1] = torch.from_numpy(t.routing().astype(np.int16))
                assert torch.equal(routed[r, c : c + t.num_tokens], expected)
                checked.add(t.traj_id)
    assert checked == {t.traj_id for t in trajs}
    for _, micro, packed in micro_batches_of(batch, token_budget=20, packed=False):
        assert packed is None and micro.routed_experts.shape[1] == micro.input_ids.shape[1]


def test_a_dense_batch_carries_no_routing():
    batch = collate([trajectory(0, 3, 2, routed=False)], np.zeros(1))
    assert batch.routed_experts is None
    assert all(p.routed_experts is None for _, _, p in micro_batches_of(batch, 64, packed=True))
