"""The transformers engine (the fallback) behind the same actor, the partial-rollout switch,
and the "auto" backend falling back when vLLM cannot start."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch
from rollout_fixtures import Sender, load_model, model_dir, random_weights, reference_logprobs

from rollout.actor import rollout_actor
from rollout.config import RolloutConfig
from rollout.records import PromptItem
from vespo.models.tiny import TinyModelConfig, tiny_model

ITEMS = [PromptItem(f"g-{i}", p, answer="") for i, p in enumerate(["3+4=", "7+1="])]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def start(cfg: RolloutConfig):
    actor = rollout_actor(cfg, None, "hf-0")
    info = ray.get(actor.start.remote())
    return actor, info


def stop(actor) -> None:
    ray.get(actor.shutdown.remote())
    ray.kill(actor)


def check_logprobs(trajs, weights, path, tol=1e-4) -> float:
    model = load_model(path, weights)
    gap = 0.0
    for t in trajs:
        ref = reference_logprobs(model, t.prompt_ids, t.response_ids)
        gap = max(gap, (ref - torch.tensor(t.behavior_logprobs)).abs().max().item())
    assert gap < tol
    return gap


@pytest.mark.parametrize("partial", [True, False])
def test_transformers_engine_updates_and_versions(partial):
    path = model_dir()
    # float32: check_logprobs holds the engine to transformers' log-probs within 1e-4
    cfg = RolloutConfig(model_path=path, backend="transformers", n=3, max_new_tokens=300, max_model_len=340,
                        partial_rollout=partial, hf_chunk_tokens=8, dtype="float32")  # fmt: skip
    actor, info = start(cfg)
    try:
        assert info["backend"] == "transformers"
        warm = load_model(path).state_dict()
        result = ray.get(actor.generate.remote(ITEMS))
        assert len(result.trajectories) == 6 and all((t.token_versions == 0).all() for t in result.trajectories)
        check_logprobs(result.trajectories, warm, path)

        sender = Sender([actor])
        w1 = random_weights(path, seed=1)
        assert sender.send(w1, 1)[0]["version"] == 1
        w_old, v = w1, 1
        for delay in (0.3, 0.1, 0.02):  # land the update mid-generation; sooner if it had finished
            w_new = random_weights(path, seed=v + 1)
            ref = actor.generate.remote(ITEMS)
            time.sleep(delay)
            sender.send(w_new, v + 1)
            done_when_sent = bool(ray.wait([ref], timeout=0)[0])
            result = ray.get(ref)
            versions = [set(t.token_versions.tolist()) for t in result.trajectories]
            if not partial or any(len(vs) == 2 for vs in versions):
                break
            w_old, v = w_new, v + 1
        if partial:
            assert any(vs == {v, v + 1} for vs in versions), versions
        else:  # the update waited for the in-flight request: it was done first, all tokens from v
            assert done_when_sent and all(vs == {v} for vs in versions), versions
        w1, w2 = w_old, w_new
        old, new = load_model(path, w1), load_model(path, w2)
        for t in result.trajectories:
            assert np.all(np.diff(t.token_versions) >= 0)
            lp = torch.tensor(t.behavior_logprobs)
            for model, tag in ((old, v), (new, v + 1)):
                mask = torch.tensor(t.token_versions == tag)
                if mask.any():
                    ref_lp = reference_logprobs(model, t.prompt_ids, t.response_ids)
                    assert (lp[mask] - ref_lp[mask]).abs().max().item() < 1e-4
    finally:
        stop(actor)


def test_auto_falls_back_to_transformers_when_vllm_cannot_start(caplog):
    # vLLM's CPU attention rejects head_dim 16: a real reason for vLLM not to start
    path = str(tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_heads=2, head_dim=16,
                                          warmup_steps=0)))  # fmt: skip
    actor, info = start(RolloutConfig(model_path=path, backend="auto", n=2, max_new_tokens=4, max_model_len=64))
    try:
        assert info["backend"] == "transformers"
        result = ray.get(actor.generate.remote(ITEMS[:1]))
        assert len(result.trajectories) == 2 and not result.errors
    finally:
        stop(actor)
