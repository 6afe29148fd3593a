"""A real pretrained model on the real stack: SmolLM2-135M-Instruct (Llama architecture, tied
embeddings, ChatML template, eos <|im_end|>) in a vLLM engine actor and a DeepSpeed learner.

What a toy model cannot show: the chat template reaching the engine intact, responses that
end with the model's own end-of-turn token (which the learner must train on), engine and
learner agreeing on the log-probs of a 30-layer model, and an update to the tied
embedding/output matrix reaching the engine's output layer after a broadcast.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from learner.config import LearnerConfig
from learner.group import LearnerGroup
from rollout.actor import rollout_actor
from rollout.config import RolloutConfig
from rollout.tasks.registry import TaskConfig, TaskSample
from vespo.models import resolve_model
from vespo.orchestration.prompts import prompt_item

# fp32 on both sides. vLLM's CPU kernels (fused qkv/gate-up, its own attention and RMSNorm)
# sum in another order than transformers' eager path; over 30 layers that moves a token's
# log-prob by up to ~1e-3 (measured: mean ~1e-5). A wrong weight, a missing temperature or
# an untied output layer moves it by far more than 0.05 on most tokens.
MAX_ABS, MEAN_ABS = 2e-2, 1e-3

PROBLEMS = [(f"What is {a} + {b}? Give only the number.", str(a + b)) for a, b in [(2, 3), (4, 4), (5, 1), (7, 2)]]
SYSTEM = "You are a careful assistant."


def samples() -> list[TaskSample]:
    return [
        TaskSample(f"p{i}", "", answer, data_source="test/sums",
                   messages=({"role": "system", "content": SYSTEM}, {"role": "user", "content": q}))
        for i, (q, answer) in enumerate(PROBLEMS)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stack():
    from transformers import AutoTokenizer

    model = resolve_model("smollm2-135m")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="test_real_model")
    rollout = RolloutConfig(model_path=model, n=4, max_new_tokens=64, max_model_len=320, dtype="float32", seed=1)
    engine = rollout_actor(rollout, TaskConfig(name="math", path="unused.parquet", reward_workers=1))
    learner = None
    try:
        ray.get(engine.start.remote())
        learner = LearnerGroup(LearnerConfig(model_path=model, lr=1e-4, grad_clip=0.0, eps=1e-5))
        host, port, secret = learner.open_weight_sync(1, 16 << 20)
        ray.get([learner.connect_weight_sync(), engine.init_weight_group.remote(host, port, 1, 2, "gloo", secret)])
        yield {"engine": engine, "learner": learner, "tokenizer": AutoTokenizer.from_pretrained(model), "model": model}
    finally:
        ray.get(engine.shutdown.remote())
        if learner is not None:
            learner.shutdown()
        ray.shutdown()


def generate(stack, tag: str):
    items = [prompt_item(f"{tag}-{s.id}", s, stack["tokenizer"]) for s in samples()]
    result = ray.get(stack["engine"].generate.remote(items))
    assert not result.errors, result.errors
    return items, result.trajectories


def logprob_gap(stack, trajs) -> np.ndarray:
    batch = stack["learner"].with_old_logprobs(stack["learner"].make_batch(trajs, stack["tokenizer"].pad_token_id))
    mask = batch.response_mask.bool()
    return (batch.old_logprobs - batch.behavior_logprobs)[mask].abs().numpy()


def test_prompts_reach_the_engine_through_the_chat_template_and_responses_end_on_eos(stack):
    tokenizer = stack["tokenizer"]
    items, trajs = generate(stack, "template")
    assert items[0].text == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{PROBLEMS[0][0]}<|im_end|>\n<|im_start|>assistant\n"
    )
    by_group = {t.group_id: t for t in trajs}
    for item in items:  # the engine tokenized exactly the rendered text (no second BOS, nothing dropped)
        assert tokenizer.decode(by_group[item.group_id].prompt_ids) == item.text
    stopped = [t for t in trajs if t.finish_reason == "stop"]
    assert len(stopped) >= len(trajs) // 4, [t.finish_reason for t in trajs]
    eos = tokenizer.eos_token_id
    for t in stopped:  # the end-of-turn token is in the response (it is an action the learner trains on)
        assert t.response_ids[-1] == eos and eos not in list(t.response_ids[:-1])
    for t in trajs:
        assert "<|im_end|>" not in tokenizer.decode(t.response_ids, skip_special_tokens=True)
    # math-verify scored in the actor's reward workers: no sample lost its reward
    assert all("reward_error" not in t.extra for t in trajs), [t.extra.get("reward_error") for t in trajs]
    assert {t.extra["data_source"] for t in trajs} == {"test/sums"}


def test_engine_and_learner_agree_on_log_probs(stack):
    _, trajs = generate(stack, "agree")
    gap = logprob_gap(stack, trajs)
    assert gap.size > 20
    assert gap.max() < MAX_ABS and gap.mean() < MEAN_ABS, (gap.max(), gap.mean())


def test_an_update_to_the_tied_embeddings_reaches_the_engine(stack):
    engine, learner = stack["engine"], stack["learner"]
    _, trajs = generate(stack, "before")
    before = learner.full_state_dict()["model.embed_tokens.weight"].clone()
    learner.train_step(learner.make_batch(trajs, stack["tokenizer"].pad_token_id))
    after = learner.full_state_dict()
    assert not torch.equal(after["model.embed_tokens.weight"], before)  # the step moved the shared matrix
    assert torch.equal(after["lm_head.weight"], after["model.embed_tokens.weight"])  # still tied in the learner
    plan = learner.weight_plan()
    receiving = engine.receive_weights.remote(plan, 1)
    ray.get(learner.broadcast_weights(plan))
    assert ray.get(receiving)["version"] == 1
    engine_embed = ray.get(engine.weights.remote(["model.embed_tokens.weight"]))["model.embed_tokens.weight"]
    assert torch.equal(engine_embed, after["model.embed_tokens.weight"])
    # the engine's output layer uses the updated matrix: new samples' log-probs match the
    # learner's under the new weights (a stale lm_head would put them far apart)
    _, fresh = generate(stack, "after")
    assert all(set(t.token_versions) == {1} for t in fresh)
    gap = logprob_gap(stack, fresh)
    assert gap.max() < MAX_ABS and gap.mean() < MEAN_ABS, (gap.max(), gap.mean())
