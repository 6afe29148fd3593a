"""A LoRA-trained learner (learner.lora) feeds the vLLM CPU engine through the real weight group:
the engine receives the base model's weights with the adapter merged in, and samples with the
learner's log-probs, not the ones of the weights it started from."""

from __future__ import annotations

import numpy as np
import ray
import torch
from rollout_fixtures import load_model, reference_logprobs

from learner.config import LearnerConfig, LoraConfig
from learner.group import LearnerGroup
from rollout.actor import rollout_actor
from rollout.config import RolloutConfig
from rollout.records import PromptItem
from rollout.tasks.registry import TaskConfig
from vespo.models import resolve_model

PROMPTS = [f"{a}+{b}=" for a, b in [(3, 4), (7, 1), (2, 2), (9, 8), (5, 0), (6, 6), (1, 8), (4, 3)]]
MAX_GAP = 1e-3  # float32 on both sides; vLLM's CPU kernels sum in another order (~1e-5)


def items(tag: str) -> list[PromptItem]:
    answer = lambda p: str(sum(int(x) for x in p.rstrip("=").split("+")))  # noqa: E731
    return [PromptItem(f"{tag}-{i}", p, answer=answer(p), sample_id=str(i)) for i, p in enumerate(PROMPTS)]


def max_gap(trajs, model) -> float:
    return max(
        (reference_logprobs(model, t.prompt_ids, t.response_ids) - torch.tensor(t.behavior_logprobs)).abs().max().item()
        for t in trajs
    )


def test_a_lora_step_reaches_the_engine_merged(tmp_path):
    path = resolve_model("tiny")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="test_lora_engine")
    learner = engine = None
    try:
        cfg = LearnerConfig(model_path=path, zero_stage=3, lr=3e-2, grad_clip=0.0, lora=LoraConfig(rank=4))
        learner = LearnerGroup(cfg)
        rollout = RolloutConfig(model_path=path, n=4, max_new_tokens=8, max_model_len=64, dtype="float32")
        engine = rollout_actor(rollout, TaskConfig(name="arithmetic", max_digits=1), "lora-0")
        ray.get(engine.start.remote())
        host, port, secret = learner.open_weight_sync(1, 256 << 10)
        ray.get([learner.connect_weight_sync(), engine.init_weight_group.remote(host, port, 1, 2, "gloo", secret)])

        result = ray.get(engine.generate.remote(items("before")))
        assert not result.errors, result.errors
        for _ in range(2):  # the adapter's B starts at zero: the second step moves A too
            metrics = learner.train_step(learner.make_batch(result.trajectories)).metrics
        assert np.isfinite(metrics["actor/loss"]) and metrics["actor/grad_norm"] > 0
        merged = learner.full_state_dict()

        plan = learner.weight_plan()
        receiving = engine.receive_weights.remote(plan, 1)
        ray.get(learner.broadcast_weights(plan))
        assert ray.get(receiving)["version"] == 1
        after = ray.get(engine.generate.remote(items("after")))
        assert not after.errors, after.errors
    finally:
        if engine is not None:
            ray.get(engine.shutdown.remote())
        if learner is not None:
            learner.shutdown()
        ray.shutdown()
    trajs = after.trajectories
    assert all(set(t.token_versions.tolist()) == {1} for t in trajs)
    gap, stale = max_gap(trajs, load_model(path, merged)), max_gap(trajs, load_model(path))
    print(f"after the LoRA update: gap to the merged learner {gap:.2e}, to the base weights {stale:.2e}")
    assert gap < MAX_GAP < 10 * MAX_GAP < stale  # the engine samples from the merged weights, not the base
