"""learner.routing_replay through the DeepSpeed learner: trajectories carrying the engine's
routing are scored on those experts (pi_old and the training forward alike), packed or padded,
under ZeRO 0 and 3; with replay off the same routing is only compared, for the dashboard."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from learner_fixtures import VOCAB, in_process_rank, synthetic_trajectories
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from learner.batching import collate
from learner.config import LearnerConfig
from learner.routing_replay import moe_layers
from learner.sharding import batch_totals

LAYERS, EXPERTS, TOP_K = 2, 8, 2


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, norm_topk_prob=True, initializer_range=0.2, tie_word_embeddings=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("moe")
    Qwen3MoeForCausalLM(config).save_pretrained(path)
    return str(path)


def own_routing(model, ids: np.ndarray) -> np.ndarray:
    """(tokens, layers, top_k): the experts a plain forward of this sequence chooses."""
    chosen = []
    hooks = [r.register_forward_hook(lambda _m, _a, out: chosen.append(out[2])) for r in moe_layers(model)]
    with torch.no_grad():
        model(torch.from_numpy(ids.astype(np.int64))[None])
    for h in hooks:
        h.remove()
    return torch.stack(chosen, dim=1).numpy()


def routed(moe_dir: str, other: bool) -> list:
    """Synthetic trajectories with the routing an engine would record: the model's own choice for
    every token it ran (all but the last), or other experts (disjoint from it) where `other`."""
    model = Qwen3MoeForCausalLM.from_pretrained(moe_dir).eval()
    out = []
    for t in synthetic_trajectories(n_groups=3, group_size=3):
        routing = own_routing(model, np.concatenate([t.prompt_ids, t.response_ids]))[:-1]
        if other:
            routing = (routing + TOP_K) % EXPERTS  # a top-2 pair shifted by 2 never meets itself
        out.append(dataclasses.replace(t, routed_experts=routing.reshape(-1), routing_shape=(LAYERS, TOP_K),
                                       loss_mask=None))  # fmt: skip
    return out


def scored(moe_dir: str, trajs: list, replay: str, zero: int = 0, packed: bool = True):
    batch = collate(trajs, np.linspace(-1, 1, len(trajs)))
    cfg = LearnerConfig(model_path=moe_dir, routing_replay=replay, zero_stage=zero, pack_sequences=packed,
                        micro_batch_tokens=48)  # fmt: skip
    with in_process_rank(cfg) as worker:
        return worker.compute_logprobs(batch), worker.evaluate_loss(batch, batch_totals(batch)).metrics, batch


def test_replaying_the_models_own_routing_changes_nothing_and_agrees_everywhere(moe_dir):
    own = routed(moe_dir, other=False)
    plain, metrics_off, batch = scored(moe_dir, own, "off")
    replayed, metrics_on, _ = scored(moe_dir, own, "rollout")
    mask = batch.response_mask.bool()
    assert torch.allclose(plain[mask], replayed[mask], atol=1e-5)
    tokens = int(batch.attention_mask.sum() - len(own))  # every token the engine ran: all but each last
    for metrics in (metrics_off, metrics_on):
        assert metrics["routing/agreement"] == 1.0 and metrics["routing/pairs"] == tokens * LAYERS
        assert metrics["routing/load_tv"] < 1e-6
        loads = [v for k, v in metrics.items() if k.startswith("routing/load_rollout/e")]
        assert len(loads) == EXPERTS and abs(sum(loads) - 1.0) < 1e-5


@pytest.fixture(scope="module")
def other_scored(moe_dir):
    """Trajectories routed to other experts than the model's own, scored packed under ZeRO-0."""
    other = routed(moe_dir, other=True)
    return other, scored(moe_dir, other, "off"), scored(moe_dir, other, "rollout")


def test_other_experts_are_what_the_learner_scores_with_replay_on(other_scored):
    _, (plain, metrics_off, batch), (replayed, metrics_on, _) = other_scored
    mask = batch.response_mask.bool()
    assert (plain[mask] - replayed[mask]).abs().max() > 1e-3  # the routing really changed the policy
    assert metrics_off["routing/agreement"] == 0.0  # disjoint by design
    # on the replayed experts, later layers see other hidden states and may route either way
    assert metrics_on["routing/agreement"] < 0.1
    # the training forward runs on the same experts: its loss is not the own-routing one
    assert metrics_on["actor/loss"] != metrics_off["actor/loss"]


@pytest.mark.parametrize(("zero", "packed"), [(0, False), (3, True)])
def test_replay_is_the_same_padded_and_under_zero3(moe_dir, other_scored, zero, packed):
    other, _, (reference, _, batch) = other_scored
    replayed, metrics, _ = scored(moe_dir, other, "rollout", zero, packed)
    mask = batch.response_mask.bool()
    assert torch.allclose(replayed[mask], reference[mask], atol=1e-5)
    assert metrics["routing/agreement"] < 0.1
