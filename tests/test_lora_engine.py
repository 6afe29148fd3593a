"""A LoRA-trained learner (learner.lora) feeds the engines through the real weight group: each sync
carries the adapter alone, the vLLM CPU engine loads it into its LoRA slot in memory (the
transformers engine merges it into its weights), and both then sample with the learner's
log-probs, never those of the adapter before."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import ray
import torch
from rollout_fixtures import load_model, reference_logprobs

from learner.config import LearnerConfig, LoraConfig
from learner.group import LearnerGroup
from rollout.actor import rollout_actor
from rollout.config import RolloutConfig
from rollout.hf_engine import TransformersEngine
from rollout.records import PromptItem
from rollout.tasks.registry import TaskConfig
from vespo.models import resolve_model
from weightsync.adapter import AdapterMerger, is_adapter, vllm_max_rank

PROMPTS = [f"{a}+{b}=" for a, b in [(3, 4), (7, 1), (2, 2), (9, 8), (5, 0), (6, 6), (1, 8), (4, 3)]]
MAX_GAP = 1e-3  # float32 on both sides; vLLM's CPU kernels sum in another order (~1e-5)
UPDATES = 2


def items(tag: str) -> list[PromptItem]:
    answer = lambda p: str(sum(int(x) for x in p.rstrip("=").split("+")))  # noqa: E731
    return [PromptItem(f"{tag}-{i}", p, answer=answer(p), sample_id=str(i)) for i, p in enumerate(PROMPTS)]


def gaps(trajs, models: dict[int, torch.nn.Module]) -> dict[int, float]:
    """Per weight version: the largest |engine - model| log-prob gap over the tokens tagged with it."""
    out: dict[int, float] = {}
    for t in trajs:
        versions = np.asarray(t.token_versions)
        for v in set(versions.tolist()):
            ref = reference_logprobs(models[v], t.prompt_ids, t.response_ids)[torch.from_numpy(versions == v)]
            behaviour = torch.tensor(t.behavior_logprobs)[torch.from_numpy(versions == v)]
            out[v] = max(out.get(v, 0.0), (ref - behaviour).abs().max().item())
    return out


def test_adapter_syncs_reach_the_vllm_engine_and_no_stale_adapter_is_served():
    path = resolve_model("tiny")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="test_lora_engine")
    learner = engine = None
    merged: dict[int, dict[str, torch.Tensor]] = {}
    results, received, full_bytes = {}, [], 0
    try:
        cfg = LearnerConfig(model_path=path, zero_stage=3, lr=3e-2, grad_clip=0.0, lora=LoraConfig(rank=4))
        learner = LearnerGroup(cfg)
        # recompute: a request paused by an update recomputes its KV, so each of its tokens is the
        # model of the version it is tagged with, which transformers can reproduce
        rollout = RolloutConfig(model_path=path, n=4, max_new_tokens=8, max_model_len=64, dtype="float32",
                                lora_rank=4, update_kv="recompute")  # fmt: skip
        engine = rollout_actor(rollout, TaskConfig(name="arithmetic", max_digits=1), "lora-0")
        ray.get(engine.start.remote())
        host, port, secret = learner.open_weight_sync(1, 256 << 10)
        ray.get([learner.connect_weight_sync(), engine.init_weight_group.remote(host, port, 1, 2, "gloo", secret)])
        merged[0] = learner.full_state_dict()
        full_bytes = sum(t.numel() * t.element_size() for t in merged[0].values())
        results[0] = ray.get(engine.generate.remote(items("v0")))
        plan = learner.weight_plan()
        assert is_adapter(name for bucket in plan for name, _, _ in bucket)
        for version in range(1, UPDATES + 1):
            for _ in range(2 if version == 1 else 1):  # the adapter's B starts at zero: a second step moves A
                learner.train_step(learner.make_batch(results[version - 1].trajectories))
            merged[version] = learner.full_state_dict()
            in_flight = engine.generate.remote(items(f"during-{version}"))  # may straddle the update
            receiving = engine.receive_weights.remote(plan, version)
            ray.get(learner.broadcast_weights(plan))
            received.append(ray.get(receiving))
            results[f"during-{version}"] = ray.get(in_flight)
            results[version] = ray.get(engine.generate.remote(items(f"v{version}")))
    finally:
        if engine is not None:
            ray.get(engine.shutdown.remote())
        if learner is not None:
            learner.shutdown()
        ray.shutdown()
    assert all(not r.errors for r in results.values())
    assert [r["version"] for r in received] == list(range(1, UPDATES + 1))
    sent = {r["bytes"] for r in received}
    assert len(sent) == 1 and 0 < sent.pop() < full_bytes / 20  # the adapter, not the model
    models = {v: load_model(path, merged[v]) for v in merged}
    for version in range(1, UPDATES + 1):
        now = gaps(results[version].trajectories, models)
        assert set(now) == {version}, now  # requests after a sync run under it, no older tag
        before = gaps(results[version].trajectories, {version: models[version - 1]})[version]
        print(f"after update {version}: gap to the learner {now[version]:.2e}, to the adapter before {before:.2e}")
        assert now[version] < MAX_GAP < 10 * MAX_GAP < before  # the new adapter, never the stale one
        during = gaps(results[f"during-{version}"].trajectories, models)
        assert set(during) <= {version - 1, version} and max(during.values()) < MAX_GAP, during


def test_vllm_rank_slots():
    assert [vllm_max_rank(r) for r in (1, 2, 8, 9, 16, 100)] == [1, 8, 8, 16, 16, 128]
    with pytest.raises(ValueError, match="learner.lora.rank"):
        vllm_max_rank(1024)


def test_transformers_engine_merges_adapters_from_its_base_weights():
    """The engine-side merge: each adapter replaces the last (W0 + B A, not W + B A + B' A')."""
    path = resolve_model("tiny")
    engine = TransformersEngine(RolloutConfig(model_path=path, backend="transformers", dtype="float32"))
    asyncio.run(engine.start())
    base = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    q = "model.layers.0.self_attn.q_proj"
    out_dim, in_dim = base[f"{q}.weight"].shape

    def adapter(scale: float):
        a, b = torch.randn(4, in_dim, generator=g), torch.randn(out_dim, 4, generator=g) * scale
        return [(f"base_model.model.{q}.lora_A.weight", a), (f"base_model.model.{q}.lora_B.weight", b)], b @ a

    for version in (1, 2):
        named, delta = adapter(0.01 * version)
        asyncio.run(engine.load_weights(named, version))
        weights = dict(engine.model.named_parameters())
        torch.testing.assert_close(weights[f"{q}.weight"], base[f"{q}.weight"] + delta)
        assert all(torch.equal(weights[n], base[n]) for n in base if n != f"{q}.weight")
        assert engine.version == version
    nope = [(f"base_model.model.model.nope.lora_{ab}.weight", torch.zeros(1, 1)) for ab in "AB"]
    with pytest.raises(ValueError, match="lacks"):
        AdapterMerger(engine.model).load(nope)
