"""Agent code written with the OpenAI SDK, run as episodes: real HTTP through the real `openai`
client, the tiny model's real tokenizer and chat template. The engine is scripted where exact
tokens are asserted, and the real transformers engine where log-probs must be the policy's."""

from __future__ import annotations

import asyncio
import json
import math
import sys

import aiohttp
import numpy as np
import openai
import pytest
import torch
from rollout_fixtures import load_model, model_dir, reference_logprobs
from transformers import AutoTokenizer

from rollout.agent_loop import AgentLoop, trajectory
from rollout.chat_format import ChatFormat
from rollout.config import RolloutConfig
from rollout.envs.registry import make_env_factory
from rollout.episode import EpisodeLimits
from rollout.openai_agent_episode import run_agent_episode
from rollout.openai_server import AgentServer
from rollout.records import Completion, PromptItem
from rollout.tasks.base import TaskConfig, TaskSample

LIMITS = EpisodeLimits(max_turns=4, max_tokens=800, turn_tokens=200, step_timeout_s=2.0, episode_timeout_s=20.0)
SAMPLE = TaskSample("s-0", "2+2?", "4", chat=False)
ECHO_ARGS = {"type": "object", "properties": {"text": {"type": "string"}}}
ECHO = {"type": "function", "function": {"name": "echo", "description": "repeats its text", "parameters": ECHO_ARGS}}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(model_dir())


class ScriptedEngine:
    """Returns the given turns in order (cut to max_tokens), recording what it was asked."""

    def __init__(self, turns: list[list[int]], version: int = 0, fail: Exception | None = None):
        self.turns, self.version, self.fail = list(turns), version, fail
        self.prompts: list[list[int]] = []
        self.budgets: list[int | None] = []

    async def generate(self, prompt_ids, n, request_id, max_tokens=None):
        if self.fail is not None:
            raise self.fail
        k = len(self.prompts)
        self.prompts.append(list(prompt_ids))
        self.budgets.append(max_tokens)
        ids = self.turns[k][:max_tokens]
        logprobs = [-0.5 - 0.01 * i for i in range(len(ids))]
        finish = "stop" if len(ids) == len(self.turns[k]) else "length"
        return [Completion(ids, logprobs, [self.version] * len(ids), finish, self.version, self.version)]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def play(engine, agent, tok, limits=LIMITS, after=None):
    """One episode on a fresh server; `after(server)` runs once the episode is over."""

    async def go():
        server = AgentServer()
        await server.ensure_started()
        try:
            ep = await run_agent_episode(engine, tok, server, agent, SAMPLE, limits, "r")
            if after is not None:
                await after(server)
            return ep
        finally:
            await server.close()

    return asyncio.run(go())


def test_turns_are_stitched_as_sampled_and_new_messages_are_masked(tok):
    vocab = tok.get_vocab()
    merged = next(t for t in sorted(vocab, key=vocab.get) if len(t) > 1 and all(c in vocab for c in t))
    first = [vocab[c] for c in merged] + [tok.eos_token_id]  # decoding, then encoding, would merge these
    assert ids(tok, tok.decode(first, skip_special_tokens=True)) != first[:-1]
    second = ids(tok, "34") + [tok.eos_token_id]
    engine, seen = ScriptedEngine([first, second], version=3), {}

    async def agent(client: openai.AsyncOpenAI, sample: TaskSample) -> float:
        messages = [{"role": "user", "content": sample.prompt}]
        r = await client.chat.completions.create(model="any", messages=messages, temperature=0.1, max_tokens=50)
        seen["first"] = r
        messages += [r.choices[0].message, {"role": "user", "content": "again"}]
        seen["second"] = await client.chat.completions.create(model="any", messages=messages)
        return 1.0

    ep = play(engine, agent, tok)
    chat = ChatFormat(tok)
    assert ep.error is None and ep.end == "done" and ep.reward == 1.0 and ep.turns == 2
    assert ep.prompt_ids == chat.opening([{"role": "user", "content": "2+2?"}])
    appended = chat.after_turn(first, [{"role": "user", "content": "again"}])
    assert ep.response_ids == first + appended + second  # the model's tokens exactly as sampled
    assert ep.mask == [1] * len(first) + [0] * len(appended) + [1] * len(second)
    assert ep.versions == [3] * len(first) + [-1] * len(appended) + [3] * len(second)
    assert all(lp == 0.0 for lp in ep.logprobs[len(first) : -len(second)]) and ep.logprobs[0] == -0.5
    assert engine.prompts[1] == ep.prompt_ids + first + appended  # nothing re-rendered
    assert engine.budgets == [50, 200]  # the request's max_tokens, else the turn budget
    r = seen["first"]
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == tok.decode(first, skip_special_tokens=True)
    assert r.usage.completion_tokens == len(first) and r.usage.prompt_tokens == len(ep.prompt_ids)
    traj = trajectory(PromptItem("g", ""), 0, 1, ep, "e")
    assert traj.loss_mask.sum() == len(first) + len(second) and traj.version_end == 3


def test_tool_calls_come_back_in_openai_form_and_are_accepted_in_the_next_request(tok):
    call = '<tool_call>{"name": "echo", "arguments": {"text": "hi"}}</tool_call>'
    engine = ScriptedEngine([ids(tok, "Let me check." + call) + [tok.eos_token_id], ids(tok, call) + [tok.eos_token_id],
                             ids(tok, "hi") + [tok.eos_token_id]])  # fmt: skip
    got = []

    async def agent(client, sample):
        messages = [{"role": "user", "content": "say hi"}]
        for _ in range(3):
            r = await client.chat.completions.create(model="m", messages=messages, tools=[ECHO])
            got.append(r.choices[0])
            message = r.choices[0].message
            if not message.tool_calls:
                return 1.0
            # once as the SDK's own message object, once as a dict without content
            messages.append(message if len(got) == 1 else {"role": "assistant", "tool_calls": [
                c.model_dump() for c in message.tool_calls]})  # fmt: skip
            for c in message.tool_calls:
                text = json.loads(c.function.arguments)["text"]
                messages.append({"role": "tool", "tool_call_id": c.id, "content": text})
        return 0.0

    ep = play(engine, agent, tok)
    assert ep.error is None and ep.reward == 1.0 and ep.turns == 3 and ep.tool_calls == 2
    first, second, last = got
    assert first.finish_reason == "tool_calls" and first.message.content == "Let me check."
    [c] = first.message.tool_calls
    assert c.type == "function" and c.function.name == "echo" and json.loads(c.function.arguments) == {"text": "hi"}
    assert second.message.content is None and second.message.tool_calls[0].id != c.id
    assert last.finish_reason == "stop" and last.message.tool_calls is None and last.message.content == "hi"
    assert '"name": "echo"' in tok.decode(ep.prompt_ids)  # the tools were described to the model
    assert "<|tool|>hi<|assistant|>" in tok.decode(ep.response_ids)  # the tool's answer, appended


def test_keys_history_and_streaming_are_checked(tok):
    turn = ids(tok, "7") + [tok.eos_token_id]
    engine, seen = ScriptedEngine([turn] * 3), {}

    async def agent(client, sample):
        seen["client"] = client
        opening = [{"role": "user", "content": "q"}]
        bad = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="m", messages=opening)
        async with aiohttp.ClientSession() as http:  # no key at all
            async with http.post(f"{client.base_url}chat/completions", json={"messages": opening}) as resp:
                seen["no_key"] = resp.status
        assert [m.id for m in (await client.models.list()).data] == ["vespo-policy"]
        with pytest.raises(openai.BadRequestError, match="streaming is not supported"):
            await client.chat.completions.create(model="m", messages=opening, stream=True)
        r = await client.chat.completions.create(model="m", messages=opening)
        reply = {"role": "assistant", "content": r.choices[0].message.content}
        for rewritten in ([{"role": "user", "content": "other q"}, reply, {"role": "user", "content": "x"}],
                          [*opening, {"role": "assistant", "content": "not what was said"}],
                          [*opening, {"role": "user", "content": "x"}]):  # fmt: skip
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(model="m", messages=rewritten)
            seen.setdefault("why", []).append(err.value.body["message"])
        await client.chat.completions.create(model="m", messages=[*opening, reply, {"role": "user", "content": "x"}])
        return 0.5

    async def after(server):
        assert server.base_url.startswith("http://127.0.0.1:") and server._runner.addresses[0][0] == "127.0.0.1"
        assert not server.sessions
        old = seen["client"]
        again = openai.AsyncOpenAI(base_url=str(old.base_url), api_key=old.api_key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):  # the episode's key died with it
            await again.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])

    ep = play(engine, agent, tok, after=after)
    assert seen["no_key"] == 401 and len(engine.prompts) == 2  # refused requests reached no engine
    assert ep.error is None and ep.turns == 2 and ep.reward == 0.5
    assert "messages[0] rewrites" in seen["why"][0] and "messages[1] rewrites" in seen["why"][1]
    assert "messages[1] rewrites" in seen["why"][2]  # vespo's reply left out


def test_limits_end_the_episode_and_what_it_recorded_still_trains(tok):
    turn = ids(tok, "1+1") + [tok.eos_token_id]

    async def keeps_going(client, sample):
        messages = [{"role": "user", "content": "go"}]
        while True:
            r = await client.chat.completions.create(model="m", messages=messages)
            messages += [r.choices[0].message, {"role": "user", "content": "again"}]

    ep = play(ScriptedEngine([turn] * 9), keeps_going, tok, EpisodeLimits(2, 800, 64, 2.0, 20.0))
    assert ep.end == "max_turns" and ep.error is None and ep.turns == 2 and ep.reward == 0.0
    ep = play(ScriptedEngine([turn] * 9), keeps_going, tok, EpisodeLimits(9, 40, 64, 2.0, 20.0))
    assert ep.end == "length" and ep.error is None and len(ep.prompt_ids) + len(ep.response_ids) <= 40

    async def catches(client, sample):
        try:
            await keeps_going(client, sample)
        except openai.BadRequestError as err:
            assert "rollout.max_model_len" in err.body["message"]
            return 0.25

    ep = play(ScriptedEngine([turn] * 9), catches, tok, EpisodeLimits(9, 40, 64, 2.0, 20.0))
    assert ep.end == "length" and ep.error is None and ep.reward == 0.25


async def _raises(client, sample):
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])
    raise ValueError("boom")


async def _nan(client, sample):
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])
    return math.nan


async def _text(client, sample):
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])
    return "1.0"


async def _silent(client, sample):
    return 1.0


async def _slow(client, sample):
    await asyncio.sleep(30)


@pytest.mark.parametrize("agent, why", [
    (_raises, "agent raised ValueError: boom"),
    (_nan, "agent reward nan is not finite"),
    (_text, "not a number"),
    (_silent, "without asking for a completion"),
    (_slow, "task.episode_timeout_s=0.5s"),
])  # fmt: skip
def test_a_failing_agent_ends_its_episode_with_a_reason_and_it_never_trains(tok, agent, why):
    turn = ids(tok, "7") + [tok.eos_token_id]
    ep = play(ScriptedEngine([turn] * 2), agent, tok, EpisodeLimits(4, 400, 64, 0.5, 0.5))
    assert ep.end == "error" and why in ep.error
    assert trajectory(PromptItem("g", ""), 0, 1, ep, "e").extra["reward_error"].startswith("episode failed:")


def test_a_plain_function_runs_in_a_thread_and_an_engine_failure_propagates(tok):
    turn = ids(tok, "7") + [tok.eos_token_id]

    def sync_agent(client: openai.OpenAI, sample):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": sample.prompt}])
        return float(r.choices[0].message.content == "7")

    ep = play(ScriptedEngine([turn]), sync_agent, tok)
    assert ep.error is None and ep.reward == 1.0 and ep.mask == [1] * len(turn)
    with pytest.raises(RuntimeError, match="engine down"):
        play(ScriptedEngine([], fail=RuntimeError("engine down")), _raises, tok)


AGENT_MODULE = """
async def run(client, sample):
    messages = [{"role": "user", "content": sample.prompt}]
    r = await client.chat.completions.create(model="m", messages=messages)
    messages += [r.choices[0].message, {"role": "user", "content": "And " + sample.answer + "?"}]
    r = await client.chat.completions.create(model="m", messages=messages, max_tokens=4)
    return 1.0 if r.choices[0].message.content is not None else 0.0
"""


def test_the_agent_loop_runs_the_agent_on_the_real_engine_with_real_logprobs(tmp_path, monkeypatch, tok):
    from rollout.hf_engine import TransformersEngine

    (tmp_path / "my_agent_mod.py").write_text(AGENT_MODULE)
    (tmp_path / "items.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    task = TaskConfig(name="env", env="openai_agent:my_agent_mod:run", path=str(tmp_path / "items.jsonl"),
                      eval_fraction=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="cannot import no_such_mod"):
        make_env_factory(TaskConfig(name="env", env="openai_agent:no_such_mod:run", path=str(tmp_path / "items.jsonl")))
    with pytest.raises(ValueError, match="needs task.path"):
        make_env_factory(TaskConfig(name="env", env="openai_agent:my_agent_mod:run"))
    envs = make_env_factory(task)
    [sample, _] = envs.samples("train")
    cfg = RolloutConfig(model_path=model_dir(), backend="transformers", max_new_tokens=8, max_model_len=128,
                        dtype="float32")  # fmt: skip

    async def go():
        engine = TransformersEngine(cfg)
        await engine.start()
        loop = AgentLoop(task, cfg, envs, [], tok)
        try:
            return await loop.group(engine, PromptItem("g0", sample.prompt, sample.answer, sample.id), 2, "r", "e0")
        finally:
            await loop.close()
            assert loop.server is None

    trajs = asyncio.run(go())
    model = load_model(model_dir())
    for t in trajs:
        assert "reward_error" not in t.extra and t.extra["turns"] == 2 and t.reward == 1.0
        mask = t.loss_mask.astype(bool)
        assert 0 < mask.sum() < len(mask) and (np.asarray(t.token_versions)[~mask] == -1).all()
        ref = reference_logprobs(model, t.prompt_ids, t.response_ids)
        lp = torch.as_tensor(np.asarray(t.behavior_logprobs, dtype=np.float32))
        assert (lp[mask] < 0).all() and (ref[mask] - lp[mask]).abs().max() < 1e-3  # the policy's own log-probs
        assert "And 2?" in tok.decode(t.response_ids)
    assert "my_agent_mod" in sys.modules
