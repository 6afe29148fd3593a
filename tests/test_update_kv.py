"""rollout.update_kv on the real vLLM CPU engine: what a request paused by a weight update
resumes on, and what its behaviour log-probs then are.

"keep": the request resumes on the keys and values cached under the old weights; the tokens it
samples next are tagged with the new version and their log-probs are those the engine really
sampled from: new weights attending over the old cache (reproduced here with transformers by
continuing the old model's cache with the new model), not a fresh pass of the new weights.
"recompute" (the other module's rig, tests/test_rollout.py) gives the fresh pass.
"""

from __future__ import annotations

import time

import pytest
import ray
import torch
from rollout_fixtures import Sender, load_model, model_dir, random_weights, reference_logprobs

from rollout.actor import rollout_actor
from rollout.config import RolloutConfig
from rollout.records import PromptItem


@pytest.fixture(scope="module")
def keep_engine():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    path = model_dir()
    cfg = RolloutConfig(model_path=path, n=2, max_new_tokens=200, max_model_len=256, dtype="float32")
    assert cfg.update_kv == "keep"  # the default
    actor = rollout_actor(cfg, None, "engine-keep")
    ray.get(actor.start.remote())
    yield path, actor, Sender([actor])
    ray.get(actor.shutdown.remote())
    ray.kill(actor)
    if started:
        ray.shutdown()


@torch.no_grad()
def stale_cache_logprobs(old_model, new_model, prompt_ids, response_ids, kept: int) -> torch.Tensor:
    """Log-probs of response tokens kept.. when the old weights computed the cache of the prompt
    and of the first kept-1 response tokens (the kept-th was sampled by the last old step; the
    first new step computes its keys and values) and the new weights carry on from that cache."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    cut = len(prompt_ids) + kept - 1
    cache = old_model(input_ids=ids[:, :cut], use_cache=True).past_key_values
    logits = new_model(input_ids=ids[:, cut:], past_key_values=cache, use_cache=True).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, cut + 1 :].unsqueeze(-1)).squeeze(-1)


def test_keep_resumes_on_the_old_cache_and_records_what_was_sampled(keep_engine):
    path, actor, sender = keep_engine
    w_old, w_new = random_weights(path, seed=3), random_weights(path, seed=4)  # near-uniform: long responses
    sender.send(w_old, 1)
    items = [PromptItem(f"keep-{i}", p, sample_id=str(i)) for i, p in enumerate(["3+4=", "7+1="])]
    ref = actor.generate.remote(items)
    deadline = time.monotonic() + 60
    while ray.get(actor.running.remote()) == 0:
        assert time.monotonic() < deadline, "the requests never reached the engine"
        time.sleep(0.01)
    time.sleep(0.3)  # some tokens under the old weights
    sender.send(w_new, 2)
    result = ray.get(ref)
    mixed = [t for t in result.trajectories if set(t.token_versions.tolist()) == {1, 2}]
    assert mixed, "no response was interrupted by the update"
    old_model, new_model = load_model(path, w_old), load_model(path, w_new)
    fresh_gaps = []
    for t in mixed:
        kept = int((t.token_versions == 1).sum())
        lp = torch.tensor(t.behavior_logprobs)
        assert (lp[:kept] - reference_logprobs(old_model, t.prompt_ids, t.response_ids)[:kept]).abs().max() < 1e-3
        stale = stale_cache_logprobs(old_model, new_model, t.prompt_ids, t.response_ids, kept)
        assert (lp[kept:] - stale).abs().max() < 1e-3, "new tokens are not the new weights over the old cache"
        fresh = reference_logprobs(new_model, t.prompt_ids, t.response_ids)[kept:]
        fresh_gaps.append((lp[kept:] - fresh).abs().max().item())
    # and that is not what a fresh pass of the new weights gives: the cache really was kept
    assert max(fresh_gaps) > 1e-2, fresh_gaps
    print(f"keep: {len(mixed)} responses span the update; |engine - fresh pass| up to {max(fresh_gaps):.3f}")
