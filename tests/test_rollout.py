"""The rollout actor with the real vLLM CPU engine on the tiny model.

One engine serves the whole module (starting vLLM costs ~20 s here), so the tests run in
order and track the engine's weights and version in `rig`.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch
from rollout_fixtures import Sender, load_model, model_dir, random_weights, reference_logprobs

from buffer.actor import buffer_actor, unpack_batch
from buffer.config import BufferConfig
from rollout.actor import rollout_actor
from rollout.config import RolloutConfig
from rollout.records import PromptItem
from rollout.tasks.registry import TaskConfig

PROMPTS = ["3+4=", "7+1=", "2+2=", "9+8="]


def answer(prompt: str) -> str:
    a, _, b = prompt.rstrip("=").partition("+")
    return str(int(a) + int(b)) if a.isdigit() and b.isdigit() else ""


class Rig:
    def __init__(self):
        self.path = model_dir()
        # float32: these tests check vLLM's log-probs against transformers' to 1e-3 (bf16 is ~3e-2)
        # update_kv "recompute": a paused request's new tokens are scored by a fresh pass of the new
        # weights (tests/test_update_kv.py has "keep")
        self.cfg = RolloutConfig(model_path=self.path, n=4, max_new_tokens=200, max_model_len=256, num_cpus=1,
                                 dtype="float32", update_kv="recompute")  # fmt: skip
        self.actor = rollout_actor(self.cfg, TaskConfig(name="arithmetic", max_digits=1), "engine-0")
        self.info = ray.get(self.actor.start.remote())
        self.weights = load_model(self.path).state_dict()
        self.version = 0
        self.sender = None

    def items(self, prompts=PROMPTS, tag="g"):
        return [PromptItem(f"{tag}-{i}", p, answer=answer(p), sample_id=str(i)) for i, p in enumerate(prompts)]

    def update(self, weights, version):
        if self.sender is None:
            self.sender = Sender([self.actor])
        out = self.sender.send(weights, version)
        self.weights, self.version = weights, version
        return out[0]


@pytest.fixture(scope="module")
def rig():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    r = Rig()
    yield r
    ray.get(r.actor.shutdown.remote())
    ray.kill(r.actor)
    if started:
        ray.shutdown()


def max_logprob_gap(trajs, weights, path) -> float:
    model = load_model(path, weights)
    gaps = []
    for t in trajs:
        ref = reference_logprobs(model, t.prompt_ids, t.response_ids)
        gaps.append((ref - torch.tensor(t.behavior_logprobs)).abs().max().item())
    return max(gaps)


def test_engine_is_vllm_and_samples_groups(rig):
    assert rig.info["backend"] == "vllm"
    result = ray.get(rig.actor.generate.remote(rig.items()))
    assert not result.errors
    assert len(result.trajectories) == len(PROMPTS) * rig.cfg.n
    for t in result.trajectories:
        assert t.group_size == rig.cfg.n and t.engine_id == "engine-0"
        assert len(t.response_ids) == len(t.behavior_logprobs) == len(t.token_versions) > 0
        assert (t.token_versions == 0).all() and t.version_start == t.version_end == 0
        assert np.all(t.behavior_logprobs <= 0)
    # the warmed-up tiny model solves some one-digit sums: rewards are scored, and not all equal
    rewards = [t.reward for t in result.trajectories]
    assert set(rewards) <= {0.0, 1.0} and 0 < sum(rewards)


def test_logprobs_agree_with_transformers(rig):
    result = ray.get(rig.actor.generate.remote(rig.items()))
    gap = max_logprob_gap(result.trajectories, rig.weights, rig.path)
    print(f"max |vLLM - transformers| log-prob: {gap:.2e}")
    assert gap < 1e-3


def test_weight_update_changes_generation_and_versions(rig):
    before = ray.get(rig.actor.generate.remote(rig.items()))
    new = random_weights(rig.path, seed=1)
    out = rig.update(new, 1)
    assert out["version"] == 1 and out["bytes"] == sum(t.numel() * t.element_size() for t in new.values())
    assert ray.get(rig.actor.version.remote()) == 1
    # embeddings loaded bit for bit; linear layers are repacked into oneDNN's format on CPU
    # (their parameters are emptied), so the log-prob agreement below is their check
    got = ray.get(rig.actor.weights.remote(["model.embed_tokens.weight", "lm_head.weight"]))
    vocab = new["lm_head.weight"].shape[0]  # vLLM pads the vocabulary rows to a multiple of 64
    assert torch.equal(got["model.embed_tokens.weight"][:vocab], new["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"][:vocab], new["lm_head.weight"])

    after = ray.get(rig.actor.generate.remote(rig.items()))
    assert all((t.token_versions == 1).all() and t.version_start == 1 for t in after.trajectories)
    # random weights rarely emit <eos>: responses get much longer than the warmed model's
    mean_len = lambda r: np.mean([len(t.response_ids) for t in r.trajectories])  # noqa: E731
    assert mean_len(after) > 3 * mean_len(before)
    gap = max_logprob_gap(after.trajectories, new, rig.path)
    print(f"after update: max |vLLM - transformers| log-prob: {gap:.2e}")
    assert gap < 1e-3


def test_partial_rollout_keeps_per_token_versions(rig):
    w_old, v_old = rig.weights, rig.version
    w_new = random_weights(rig.path, seed=2)
    for delay in (0.5, 0.2, 0.05):  # interrupt mid-generation; retry sooner if it had finished
        ref = rig.actor.generate.remote(rig.items(PROMPTS[:2], tag=f"partial-{delay}"))
        time.sleep(delay)
        rig.update(w_new, rig.version + 1)
        result = ray.get(ref)
        mixed = [t for t in result.trajectories if len(set(t.token_versions.tolist())) == 2]
        if mixed:
            break
        w_old, v_old = w_new, rig.version
        w_new = random_weights(rig.path, seed=rig.version + 10)
    assert mixed, "no generation was interrupted by the update"
    old_model, new_model = load_model(rig.path, w_old), load_model(rig.path, rig.weights)
    for t in result.trajectories:
        versions = t.token_versions
        assert np.all(np.diff(versions) >= 0), "old tokens first, then new ones"
        assert set(versions.tolist()) <= {v_old, rig.version}
        assert t.version_start == versions[0] == v_old and t.version_end == versions[-1]
        ref_old = reference_logprobs(old_model, t.prompt_ids, t.response_ids)
        ref_new = reference_logprobs(new_model, t.prompt_ids, t.response_ids)
        lp = torch.tensor(t.behavior_logprobs)
        old, new = torch.tensor(versions == v_old), torch.tensor(versions == rig.version)
        # each token's log-prob is the one of the weights its tag names, given the whole prefix
        assert (lp[old] - ref_old[old]).abs().max().item() < 1e-3 if old.any() else True
        assert (lp[new] - ref_new[new]).abs().max().item() < 1e-3 if new.any() else True
    print(f"partial rollout: {len(mixed)}/{len(result.trajectories)} responses span two versions")


def test_without_partial_rollout_updates_wait_for_in_flight_requests(rig):
    cfg = RolloutConfig(model_path=rig.path, n=2, max_new_tokens=200, max_model_len=256, partial_rollout=False)
    actor = rollout_actor(cfg, None, "engine-wait")
    try:
        ray.get(actor.start.remote())
        sender = Sender([actor])
        sender.send(random_weights(rig.path, seed=3), 1)  # long responses
        ref = actor.generate.remote(rig.items(PROMPTS[:2], tag="wait"))
        deadline = time.monotonic() + 60
        while ray.get(actor.running.remote()) == 0:  # the update must find the requests in flight
            assert not ray.wait([ref], timeout=0)[0], "generation finished before it was seen running"
            assert time.monotonic() < deadline, "the requests never reached the engine"
            time.sleep(0.01)
        sender.send(random_weights(rig.path, seed=4), 2)
        result = ray.get(ref)
        # Without partial rollout no response spans two versions: requests already in the engine
        # finish under version 1, any that reached it during the swap run wholly under version 2.
        versions = [set(t.token_versions.tolist()) for t in result.trajectories]
        assert all(len(v) == 1 for v in versions), f"a response spans two versions: {versions}"
        assert {1} in versions, "the requests in flight at the update did not finish under the old weights"
        assert all(t.version_end == t.token_versions[0] for t in result.trajectories)
        assert ray.get(actor.version.remote()) == 2
    finally:
        ray.get(actor.shutdown.remote())
        ray.kill(actor)


def test_bad_prompts_get_clear_errors_and_actor_survives(rig):
    long_prompt = "1+1=" * 200
    items = rig.items(["", long_prompt, "5+5="], tag="bad")
    result = ray.get(rig.actor.generate.remote(items))
    assert "empty" in result.errors["bad-0"]
    assert "more than the 56 allowed" in result.errors["bad-1"]
    assert "bad-2" not in result.errors and len(result.trajectories) == rig.cfg.n
    stats = ray.get(rig.actor.get_stats.remote())
    assert stats.prompt_errors >= 2


def test_object_store_fallback_loads_weights(rig):
    warm = load_model(rig.path).state_dict()
    out = ray.get(rig.actor.load_weights.remote(ray.put(warm), rig.version + 1))
    rig.weights, rig.version = warm, rig.version + 1
    assert out["version"] == rig.version
    result = ray.get(rig.actor.generate.remote(rig.items()))
    assert all((t.token_versions == rig.version).all() for t in result.trajectories)
    assert max_logprob_gap(result.trajectories, warm, rig.path) < 1e-3


def test_submit_pushes_whole_groups_to_the_buffer(rig):
    buf = buffer_actor(BufferConfig(capacity=64, max_staleness=4, groups_per_step=2))
    ray.get(rig.actor.set_buffer.remote(buf))
    ray.get(rig.actor.submit.remote(rig.items(tag="sub")))
    ray.get(rig.actor.drain.remote())
    batch = unpack_batch(ray.get(buf.get_batch_packed.remote(len(PROMPTS), rig.version, 5.0)))
    assert batch is not None and batch.num_groups == len(PROMPTS)
    ids = sorted(t.traj_id for t in batch.trajectories)
    assert ids == sorted(f"sub-{g}/{i}" for g in range(len(PROMPTS)) for i in range(rig.cfg.n))
