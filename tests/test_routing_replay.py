"""Routing replay on small random MoE models (float32, CPU): the learner's forward takes the
replayed experts, weights them with its own router, and keeps the router's gradient."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from learner.routing_replay import RoutingReplayError, RoutingStats, moe_layers, replay_routing, routing_shape

VOCAB, LAYERS, EXPERTS, TOP_K = 48, 2, 8, 2
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
             num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
             initializer_range=0.2, num_experts_per_tok=TOP_K)  # fmt: skip
FAMILIES = {  # every family here keeps the router contract; granite returns (ids, weights, logits)
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=EXPERTS, moe_intermediate_size=32, norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2Moe", dict(num_experts=EXPERTS, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "mixtral": ("Mixtral", dict(num_local_experts=EXPERTS)),
    "olmoe": ("Olmoe", dict(num_experts=EXPERTS, norm_topk_prob=False)),
    "gpt_oss": (
        "GptOss",
        dict(
            num_local_experts=EXPERTS,
            layer_types=["full_attention"] * LAYERS,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        ),
    ),
    "granitemoe": ("GraniteMoe", dict(num_local_experts=EXPERTS)),
}
# these routers take the softmax over their top-k logits only: the same gates as the softmax over
# all experts renormalised over the top-k, up to float32 rounding
TOPK_SOFTMAX = {"gpt_oss", "granitemoe"}


def tiny(family: str = "qwen3_moe", seed: int = 0, **overrides) -> nn.Module:
    prefix, extra = FAMILIES[family]
    config = getattr(transformers, f"{prefix}Config")(**{**SMALL, **extra, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, f"{prefix}ForCausalLM")(config).eval()


def inputs(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def ids_of(output: tuple) -> torch.Tensor:
    return output[2] if not output[2].is_floating_point() else output[0]


def own_routing(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The (batch, seq, layers, top_k) experts a plain forward chooses."""
    chosen = []
    hooks = [r.register_forward_hook(lambda _m, _a, out: chosen.append(ids_of(out))) for r in moe_layers(model)]
    with torch.no_grad():
        model(input_ids)
    for h in hooks:
        h.remove()
    return torch.stack(chosen, dim=1).reshape(*input_ids.shape, len(chosen), -1)


def other_routing(like: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """Distinct random experts per (token, layer), disjoint from `like`'s choice."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.tensor([e for e in torch.randperm(EXPERTS, generator=g).tolist() if e not in row][:TOP_K])
            for row in like.reshape(-1, TOP_K).tolist()]  # fmt: skip
    return torch.stack(rows).reshape(like.shape)


def logits(model: nn.Module, input_ids: torch.Tensor, routed=None, replay=True, stats=None) -> torch.Tensor:
    with torch.no_grad(), replay_routing(model, routed, replay, stats):
        return model(input_ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_the_models_own_routing_is_a_plain_forward(family):
    model, ids = tiny(family), inputs()
    routed = own_routing(model, ids)
    assert routing_shape(model) == (LAYERS, TOP_K, EXPERTS)
    stats = RoutingStats()
    rtol = 1e-5 if family in TOPK_SOFTMAX else 0
    torch.testing.assert_close(logits(model, ids, routed, stats=stats), logits(model, ids), rtol=rtol, atol=1e-6)
    assert stats.agree == stats.total == ids.numel() * LAYERS
    assert not (logits(model, ids, other_routing(routed)) - logits(model, ids)).abs().max() < 1e-3


@pytest.mark.parametrize("norm", [True, False])
def test_replayed_experts_are_weighted_by_the_learners_router(norm):
    model, ids = tiny(norm_topk_prob=norm), inputs()
    routed = other_routing(own_routing(model, ids))
    block = model.model.layers[0].mlp
    seen = {}
    hook = block.experts.register_forward_pre_hook(
        lambda _m, args: seen.update(zip(("h", "ids", "w"), args, strict=True))
    )
    stats = RoutingStats()
    replayed = logits(model, ids, routed, stats=stats)
    hook.remove()
    assert (replayed - logits(model, ids)).abs().max() > 1e-3
    assert stats.agree == 0 and stats.total == ids.numel() * LAYERS
    expected_ids = routed[:, :, 0].reshape(-1, TOP_K)
    torch.testing.assert_close(seen["ids"], expected_ids, rtol=0, atol=0)
    probs = torch.softmax(seen["h"] @ block.gate.weight.T, dim=-1)  # the router's softmax over all experts
    gates = probs.gather(-1, expected_ids)
    if norm:
        gates = gates / gates.sum(-1, keepdim=True)
    torch.testing.assert_close(seen["w"], gates, rtol=1e-6, atol=1e-7)


def test_the_router_gets_a_gradient_under_replay():
    model, ids = tiny(), inputs()
    routed = other_routing(own_routing(model, ids))
    with replay_routing(model, routed, replay=True):
        model(ids).logits.logsumexp(-1).mean().backward()
    for router in moe_layers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_rows_of_minus_one_take_the_learners_own_choice():
    model, ids = tiny(), inputs()
    own = own_routing(model, ids)
    unset = own.clone()
    unset[0, 2:5] = -1  # whole tokens, every layer
    unset[1, :, 1] = -1  # one layer of a whole row
    unset[1, 3, 0, 1] = -1  # a single slot makes its row the learner's too
    stats = RoutingStats()
    torch.testing.assert_close(logits(model, ids, unset, stats=stats), logits(model, ids), rtol=0, atol=1e-6)
    assert stats.total == (unset >= 0).all(-1).sum() == stats.agree
    # with another routing elsewhere, an unset row takes whatever the learner's router picks there
    mixed = other_routing(own)
    mixed[0, 2:5] = -1
    used, chosen = [], []
    hooks = [r.register_forward_hook(lambda _m, _a, out: chosen.append(out[2])) for r in moe_layers(model)]
    hooks += [layer.mlp.experts.register_forward_pre_hook(lambda _m, args: used.append(args[1]))
              for layer in model.model.layers]  # fmt: skip
    logits(model, ids, mixed)
    for h in hooks:
        h.remove()
    for layer in range(LAYERS):
        unset_rows = (mixed[:, :, layer] < 0).any(-1).reshape(-1)
        torch.testing.assert_close(used[layer][unset_rows], chosen[layer][unset_rows], rtol=0, atol=0)
        torch.testing.assert_close(used[layer][~unset_rows], mixed[:, :, layer].reshape(-1, TOP_K)[~unset_rows])


def test_a_dense_model_has_no_routing():
    config = transformers.LlamaConfig(**{k: v for k, v in SMALL.items() if k != "num_experts_per_tok"})
    model = transformers.LlamaForCausalLM(config).eval()
    assert moe_layers(model) == [] and routing_shape(model) is None
    ids = inputs()
    torch.testing.assert_close(logits(model, ids, None), logits(model, ids), rtol=0, atol=0)
    with pytest.raises(RoutingReplayError, match="LlamaForCausalLM: a routing was given but the model has no MoE"):
        logits(model, ids, torch.zeros(2, 7, 1, 1, dtype=torch.long))


def test_loads_count_every_routed_token_per_layer_and_observing_changes_nothing():
    model, ids = tiny(), inputs(batch=3, seq=5)
    own = own_routing(model, ids)
    routed = own.clone()
    routed[0] = other_routing(own[0])  # the first sequence disagrees everywhere
    stats = RoutingStats.empty(routing_shape(model))
    assert stats.metrics() == {}
    observed = logits(model, ids, routed, replay=False, stats=stats)
    torch.testing.assert_close(observed, logits(model, ids), rtol=0, atol=0)
    assert stats.learner_load.shape == stats.rollout_load.shape == (LAYERS, EXPERTS)
    assert stats.learner_load.sum(-1).tolist() == stats.rollout_load.sum(-1).tolist() == [ids.numel() * TOP_K] * LAYERS
    for layer in range(LAYERS):
        for load, ids_of_side in ((stats.rollout_load, routed), (stats.learner_load, own)):
            assert (
                load[layer].tolist() == torch.bincount(ids_of_side[:, :, layer].flatten(), minlength=EXPERTS).tolist()
            )
    assert (stats.agree, stats.total) == (2 * 5 * LAYERS, 3 * 5 * LAYERS)
    logits(model, ids, routed, replay=False, stats=stats)  # a second context adds to the same stats
    assert (stats.agree, stats.total) == (4 * 5 * LAYERS, 6 * 5 * LAYERS)
    assert stats.learner_load.sum().item() == 2 * ids.numel() * TOP_K * LAYERS
    metrics = stats.metrics()
    assert metrics["routing/agreement"] == pytest.approx(2 / 3) and metrics["routing/pairs"] == 6 * 5 * LAYERS
    assert 0 < metrics["routing/load_tv"] <= 1 / 3  # a third of the tokens moved
    assert metrics["routing/learner_imbalance"] >= 1 and metrics["routing/rollout_imbalance"] >= 1


def test_a_checkpointed_backward_inside_the_context_replays_again_and_counts_once():
    ids = inputs()
    grads = {}
    for checkpointed in (False, True):
        model = tiny().train()
        routed = other_routing(own_routing(model, ids))
        if checkpointed:
            model.gradient_checkpointing_enable()
        stats = RoutingStats()
        with replay_routing(model, routed, replay=True, stats=stats):
            model(ids).logits.logsumexp(-1).mean().backward()
        assert stats.total == ids.numel() * LAYERS and stats.agree == 0
        grads[checkpointed] = [r.weight.grad.clone() for r in moe_layers(model)]
    for plain, checkpointed in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


class SigmoidRouter(nn.Module):
    """DeepSeek-V3-like gates: sigmoid scores, which replay does not reproduce."""

    def __init__(self):
        super().__init__()
        self.top_k, self.num_experts = TOP_K, EXPERTS
        self.weight = nn.Parameter(torch.randn(EXPERTS, 16))

    def forward(self, hidden):
        router_logits = hidden @ self.weight.T
        weights, indices = router_logits.sigmoid().topk(self.top_k, dim=-1)
        return router_logits, weights, indices


class LinearGate(nn.Module):
    """A router whose weight sits in a child module: not the contract."""

    def __init__(self):
        super().__init__()
        self.top_k, self.num_experts = TOP_K, EXPERTS
        self.wg = nn.Linear(16, EXPERTS, bias=False)


class Toy(nn.Module):
    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router

    def forward(self, hidden):
        return self.router(hidden.reshape(-1, 16))


def test_routers_outside_the_contract_are_refused_by_name():
    with pytest.raises(RoutingReplayError, match=r"^Toy: router LinearGate \(router\) has no") as e:
        moe_layers(Toy(LinearGate()))
    assert "\n" not in str(e.value)
    toy, routed = Toy(SigmoidRouter()), torch.zeros(1, 4, 1, TOP_K, dtype=torch.long)
    routed[..., 1] = 1
    with replay_routing(toy, routed, replay=False):
        toy(torch.randn(1, 4, 16))  # observing needs no gate rule
    with pytest.raises(RoutingReplayError, match=r"^Toy: router SigmoidRouter does not weight its experts by softmax"):
        with replay_routing(toy, routed, replay=True):
            toy(torch.randn(1, 4, 16))
    with pytest.raises(RoutingReplayError, match="covers 4 tokens .* saw 6"):
        with replay_routing(toy, routed, replay=False):
            toy(torch.randn(1, 6, 16))
    with pytest.raises(RoutingReplayError, match=r"routed has \(layers, top_k\) = \(1, 3\)"):
        with replay_routing(toy, torch.zeros(1, 4, 1, 3, dtype=torch.long), replay=True):
            pass
    with pytest.raises(RoutingReplayError, match=r"must lie in \[-1, 8\)"):
        with replay_routing(toy, routed + EXPERTS, replay=True):
            pass


def test_deepseek_v3_is_refused_by_name():
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K,
        n_group=1, topk_group=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    ids = inputs()
    routed = own_routing(model, ids)
    with pytest.raises(RoutingReplayError, match="DeepseekV3ForCausalLM: router DeepseekV3TopkRouter does not weight"):
        logits(model, ids, routed)


def test_a_zero3_engine_replays_like_the_bare_model(tmp_path):
    """ZeRO-3 partitions each router's weight (its local shape is (0,)) and gathers it only while
    the router runs; replay through the engine gives the bare model's logits and router grads."""
    from deepspeed.utils import safe_get_full_grad
    from learner_fixtures import in_process_rank

    from learner.config import LearnerConfig

    model, ids = tiny(), inputs()
    model.save_pretrained(tmp_path)
    routed = other_routing(own_routing(model, ids))
    with replay_routing(model, routed, replay=True):
        expected = model(ids).logits
        expected.logsumexp(-1).mean().backward()
    with in_process_rank(LearnerConfig(model_path=str(tmp_path), zero_stage=3)) as worker:
        engine = worker.engine
        assert routing_shape(engine) == (LAYERS, TOP_K, EXPERTS)
        assert all(r.weight.numel() == 0 for r in moe_layers(engine))
        stats = RoutingStats()
        with replay_routing(engine, routed, replay=True, stats=stats):
            got = engine(input_ids=ids).logits
            engine.backward(got.logsumexp(-1).mean())
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert (stats.agree, stats.total) == (0, ids.numel() * LAYERS)
        for router, bare in zip(moe_layers(engine), moe_layers(model), strict=True):
            torch.testing.assert_close(safe_get_full_grad(router.weight), bare.weight.grad, rtol=1e-5, atol=1e-7)
