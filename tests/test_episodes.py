"""Multi-turn episodes: tokens kept as sampled, masks, version tags, limits, and failures that
end one episode and nothing else. Most use a scripted engine (its turns chosen by the test)
with the real tokenizer, chat template and learner code; the last plays a real chat model."""

from __future__ import annotations

import asyncio
from itertools import groupby

import numpy as np
import pytest
import torch
from rollout_fixtures import model_dir
from transformers import AutoTokenizer

from learner.batching import collate
from learner.objectives import compute_loss
from rollout.agent_loop import trajectory
from rollout.chat_format import ChatFormat
from rollout.config import RolloutConfig
from rollout.envs.base import EnvStep
from rollout.envs.tool_env import ToolEnv
from rollout.episode import EpisodeLimits, run_episode
from rollout.hf_engine import TransformersEngine
from rollout.records import Completion, PromptItem
from rollout.tasks.base import TaskSample
from rollout.tools.base import ToolError, schema
from rollout.tools.calculator import Calculator
from rollout.tools.calls import tool_system_prompt
from vespo.models import resolve_model

LIMITS = EpisodeLimits(max_turns=4, max_tokens=800, turn_tokens=200, step_timeout_s=2.0, episode_timeout_s=20.0)
SAMPLE = TaskSample("s-0", "q", "a", chat=False)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(model_dir())


class ScriptedEngine:
    """Returns the given turns in order; `bumps[k]` is the version the engine is at when turn k
    starts, and `inside[k]` a version it switches to halfway through turn k (partial rollout)."""

    def __init__(self, turns: list[list[int]], bumps: dict[int, int] | None = None, inside=None):
        self.turns, self.bumps, self.inside = list(turns), bumps or {}, inside or {}
        self.version, self.calls, self.prompts = 0, 0, []

    async def generate(self, prompt_ids, n, request_id, max_tokens=None):
        k = self.calls
        self.calls += 1
        self.version = self.bumps.get(k, self.version)
        self.prompts.append(list(prompt_ids))
        ids = self.turns[k][:max_tokens]
        versions = [self.version] * len(ids)
        if k in self.inside:
            half = len(ids) // 2
            self.version = self.inside[k]
            versions[half:] = [self.version] * (len(ids) - half)
        logprobs = [-0.5 - 0.01 * i for i in range(len(ids))]
        finish = "stop" if len(ids) == len(self.turns[k]) else "length"
        return [Completion(ids, logprobs, versions, finish, versions[0], versions[-1])]


class Script:
    """An environment answering from a list of EnvSteps (or exceptions, or coroutines)."""

    def __init__(self, steps, opening=None):
        self.steps, self.seen, self.closed = list(steps), [], False
        self.opening = opening if opening is not None else [{"role": "user", "content": "2+2?"}]

    async def reset(self, sample):
        if isinstance(self.opening, Exception):
            raise self.opening
        return self.opening

    async def step(self, turn):
        self.seen.append(turn)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        if asyncio.iscoroutine(step):
            return await step
        return step

    async def close(self):
        self.closed = True


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def play(engine, env, tok, limits=LIMITS, tools=None):
    return asyncio.run(run_episode(engine, ChatFormat(tok, tools), env, SAMPLE, limits, "r"))


def test_sampled_tokens_are_kept_where_decoding_and_encoding_would_change_them(tok):
    vocab = tok.get_vocab()
    merged = next(t for t in sorted(vocab, key=vocab.get) if len(t) > 1 and all(c in vocab for c in t))
    split = [vocab[c] for c in merged]  # the same text as the merged token, one byte-token per character
    turn = split + [tok.eos_token_id]
    assert ids(tok, tok.decode(turn, skip_special_tokens=True)) != split  # a round trip would change them
    engine = ScriptedEngine([turn, turn])
    ep = play(engine, Script([EnvStep([{"role": "user", "content": "again"}]), EnvStep(reward=1.0, done=True)]), tok)
    first = ep.response_ids[: len(turn)]
    assert first == turn and ep.response_ids[-len(turn) :] == turn
    # the second call's prompt is exactly what the episode holds: nothing re-rendered
    assert engine.prompts[1] == ep.prompt_ids + ep.response_ids[: len(engine.prompts[1]) - len(ep.prompt_ids)]


def test_environment_tokens_are_masked_and_untagged(tok):
    a, b = ids(tok, "12") + [tok.eos_token_id], ids(tok, "34") + [tok.eos_token_id]
    script = Script([EnvStep([{"role": "user", "content": "more"}]), EnvStep(reward=1.0, done=True)])
    ep = play(ScriptedEngine([a, b]), script, tok)
    mask = np.array(ep.mask)
    assert mask[: len(a)].all() and mask[-len(b) :].all() and not mask[len(a) : -len(b)].any()
    env = ~mask.astype(bool)
    assert env.sum() > 0 and all(v == -1 for v in np.array(ep.versions)[env])
    assert all(lp == 0.0 for lp in np.array(ep.logprobs)[env])
    assert tok.decode(ep.response_ids[len(a) : -len(b)]).endswith("more<|assistant|>")
    assert ep.turns == 2 and ep.reward == 1.0 and ep.end == "done" and ep.error is None


def test_version_tags_follow_updates_between_and_inside_turns(tok):
    turn = ids(tok, "1234") + [tok.eos_token_id]
    engine = ScriptedEngine([turn, turn, turn], bumps={1: 3}, inside={2: 5})
    go = EnvStep([{"role": "user", "content": "go"}])
    steps = [go, go, EnvStep(done=True)]
    ep = play(engine, Script(steps), tok)
    traj = trajectory(PromptItem("g", ""), 0, 1, ep, "engine-0")
    model = traj.token_versions[traj.loss_mask.astype(bool)]
    n = len(turn)
    assert list(model[:n]) == [0] * n and list(model[n : 2 * n]) == [3] * n
    assert set(model[2 * n :]) == {3, 5}  # a weight update landed inside the third turn
    assert traj.oldest_version() == 0 and traj.version_end == 5 and traj.staleness(6) == 6


def test_only_model_tokens_reach_the_objective(tok):
    a, b = ids(tok, "1") + [tok.eos_token_id], ids(tok, "2") + [tok.eos_token_id]
    script = Script([EnvStep([{"role": "user", "content": "x"}]), EnvStep(reward=1.0, done=True)])
    ep = play(ScriptedEngine([a, b]), script, tok)
    traj = trajectory(PromptItem("g", ""), 0, 1, ep, "e")
    batch = collate([traj], np.array([1.0]))
    assert batch.response_mask.sum() == len(a) + len(b)
    logprobs = torch.full_like(batch.behavior_logprobs, -1.0, requires_grad=True)
    losses = []
    for env_logprob in (0.0, -30.0):  # what an environment token's log-prob is must not matter
        behavior = batch.behavior_logprobs.clone()
        behavior[batch.response_mask == 0] = env_logprob
        policy = logprobs.detach().clone()
        policy[batch.response_mask == 0] = env_logprob * 2
        for objective in ("vespo", "grpo", "gspo"):
            losses.append(float(compute_loss(objective, policy, behavior, batch.advantages, batch.response_mask)[0]))
    assert losses[:3] == pytest.approx(losses[3:])


def test_turn_limit_and_token_budget_end_an_episode_that_still_trains(tok):
    turn = ids(tok, "1+1") + [tok.eos_token_id]
    go = [EnvStep([{"role": "user", "content": "again"}], reward=0.25) for _ in range(9)]
    ep = play(ScriptedEngine([turn] * 9), Script(go), tok, EpisodeLimits(3, 400, 64, 2.0, 20.0))
    assert ep.turns == 3 and ep.end == "max_turns" and ep.error is None and ep.reward == pytest.approx(0.75)
    ep = play(ScriptedEngine([turn] * 9), Script(go), tok, EpisodeLimits(9, 40, 64, 2.0, 20.0))
    assert ep.end == "length" and ep.error is None
    assert len(ep.prompt_ids) + len(ep.response_ids) <= 40


@pytest.mark.parametrize(
    "env, why",
    [
        (Script([RuntimeError("boom")]), "environment step raised RuntimeError: boom"),
        (Script([asyncio.sleep(60)]), "step took longer than task.step_timeout_s=0.5s"),
        (Script(["not a step"]), "step returned str, not an EnvStep"),
        (Script([EnvStep([{"role": "user"}])]), "not a list of {role, content} messages"),
        (Script([EnvStep(reward=float("nan"), done=True)]), "reward nan is not finite"),
        (Script([], opening=ValueError("no such item")), "environment reset raised ValueError: no such item"),
    ],
)
def test_a_failing_environment_ends_its_episode_with_a_reason_and_it_never_trains(tok, env, why):
    turn = ids(tok, "7") + [tok.eos_token_id]
    ep = play(ScriptedEngine([turn] * 3), env, tok, EpisodeLimits(4, 400, 64, 0.5, 20.0))
    assert ep.end == "error" and why in ep.error and env.closed
    traj = trajectory(PromptItem("g", ""), 0, 1, ep, "e")
    assert traj.extra["reward_error"].startswith("episode failed:")  # the batch screen drops these


def test_a_whole_episode_timeout(tok):
    turn = ids(tok, "7") + [tok.eos_token_id]
    slow = [EnvStep([{"role": "user", "content": "x"}]) for _ in range(3)]

    class Slow(Script):
        async def step(self, t):
            await asyncio.sleep(0.4)
            return await super().step(t)

    ep = play(ScriptedEngine([turn] * 4), Slow(slow), tok, EpisodeLimits(4, 400, 64, 1.0, 1.0))
    assert ep.end == "error" and "task.episode_timeout_s=1s" in ep.error


class Echo:
    name, description, parameters = "echo", "repeats its text", {"type": "object"}

    async def call(self, arguments):
        if "text" not in arguments:
            raise ToolError("echo needs 'text'")
        return arguments["text"]

    async def close(self):
        pass


def test_tool_calls_in_a_turn_are_answered_with_tool_messages(tok):
    inner = Script([EnvStep(reward=1.0, done=True)])
    env = ToolEnv(inner, [Echo()], timeout_s=1.0)
    calls = (
        '<tool_call>{"name": "echo", "arguments": {"text": "hi"}}</tool_call>'
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{"name": "echo"}</tool_call>'
    )
    turns = [ids(tok, calls) + [tok.eos_token_id], ids(tok, "hi") + [tok.eos_token_id]]
    ep = play(ScriptedEngine(turns), env, tok, tools=[{"type": "function", "function": {"name": "echo"}}])
    text = tok.decode(ep.response_ids)
    assert "<|tool|>hi<|tool|>error: no tool named 'nope'" in text and "error: echo needs 'text'" in text
    assert ep.tool_calls == 3 and ep.tool_errors == 2 and ep.reward == 1.0 and inner.seen == ["hi"]
    assert '"name": "echo"' in tok.decode(ep.prompt_ids)  # the tools were described to the model



def test_a_real_chat_model_plays_an_episode_whose_tokens_are_its_chat_template():
    """SmolLM2-135M-Instruct (ChatML, a template that ignores `tools=`) on the transformers
    engine: the prompt with the tools described in a system turn, its sampled turns and the
    environment's message between them decode to exactly what the chat template renders for the
    same conversation, and the model's tokens carry log-probs, the environment's none."""
    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    cfg = RolloutConfig(model_path=path, backend="transformers", max_new_tokens=12, max_model_len=512,
                        dtype="float32", temperature=0.0)  # fmt: skip
    question = [{"role": "user", "content": "What is 12 * 34?"}]
    env = Script([EnvStep([{"role": "user", "content": "Are you sure?"}]), EnvStep(reward=1.0, done=True)], question)
    tools = [schema(Calculator())]

    async def scenario():
        engine = TransformersEngine(cfg)
        await engine.start()
        try:
            return await run_episode(engine, ChatFormat(tok, tools), env, SAMPLE, LIMITS, "real")
        finally:
            await engine.shutdown()

    ep = asyncio.run(scenario())
    assert ep.turns == 2 and ep.end == "done" and ep.error is None
    mask = np.array(ep.mask, bool)
    runs = groupby(zip(ep.response_ids, mask, strict=True), key=lambda x: x[1])
    turns = [[t for t, _ in run] for trained, run in runs if trained]
    texts = [tok.decode(turn, skip_special_tokens=True) for turn in turns]
    assert env.seen == texts  # the environment read each turn as the model wrote it
    conversation = [{"role": "system", "content": tool_system_prompt(tools)}, *question,
                    {"role": "assistant", "content": texts[0]}, {"role": "user", "content": "Are you sure?"},
                    {"role": "assistant", "content": texts[1]}]  # fmt: skip
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    last_closed = turns[1][-1] == tok.eos_token_id  # a turn cut at max_new_tokens has no <|im_end|> yet
    assert tok.decode(ep.prompt_ids + ep.response_ids) == rendered.removesuffix("<|im_end|>\n") + (
        "<|im_end|>" if last_closed else ""
    )
    assert np.all(np.array(ep.logprobs)[mask] <= 0) and np.all(np.array(ep.logprobs)[~mask] == 0)
