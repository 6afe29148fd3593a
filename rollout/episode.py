"""One multi-turn episode: the model and an environment taking turns, token in, token out.

The model's tokens are kept as sampled, with their log-probs and the policy version each was
sampled under (a weight update may land between turns, or inside one under partial rollout:
the tags say which). The environment's messages are appended through the chat template
(`ChatFormat.after_turn`) and carry loss mask 0, log-prob 0 and version -1: no objective and
no staleness measure sees them. The runner owns the limits: `task.max_turns`, the token budget
(`rollout.max_model_len` for the whole episode, `rollout.max_new_tokens` per turn), and the
per-call and whole-episode timeouts. An environment that raises, hangs or answers with
something that is not an `EnvStep` ends the episode with `error` set: it is recorded and never
trains. An engine failure is not the episode's fault and propagates (the group is retried).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from rollout.chat_format import ChatFormat
from rollout.engine import Engine
from rollout.envs.base import Environment, EnvStep
from rollout.tasks.base import TaskSample


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int
    max_tokens: int  # prompt + every turn + every observation
    turn_tokens: int  # new tokens per model turn
    step_timeout_s: float
    episode_timeout_s: float


@dataclass
class Episode:
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    reward: float = 0.0
    step_rewards: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    end: str = ""  # done | max_turns | length | error
    error: str | None = None  # why the episode failed (it never trains)
    generate_s: float = 0.0
    env_s: float = 0.0
    version_start: int = 0
    version_end: int = 0

    @property
    def finish_reason(self) -> str:
        return {"done": "stop", "max_turns": "stop", "length": "length"}.get(self.end, "abort")

    def add(self, ids: list[int], logprobs: list[float], versions: list[int], trained: bool) -> None:
        self.response_ids += ids
        self.logprobs += logprobs
        self.versions += versions
        self.mask += [int(trained)] * len(ids)


class EpisodeFailed(Exception):
    """The environment's fault: the episode ends, recorded, untrained."""


async def run_episode(engine: Engine, chat: ChatFormat, env: Environment, sample: TaskSample, limits: EpisodeLimits,
                      request_id: str, system_prompt: str | None = None) -> Episode:  # fmt: skip
    episode = Episode(version_start=engine.version, version_end=engine.version)
    started = time.perf_counter()
    try:
        await asyncio.wait_for(_play(engine, chat, env, sample, limits, request_id, system_prompt, episode),
                               limits.episode_timeout_s)  # fmt: skip
    except TimeoutError:
        episode.end = "error"
        episode.error = f"episode took longer than task.episode_timeout_s={limits.episode_timeout_s:g}s"
    except EpisodeFailed as err:
        episode.end, episode.error = "error", str(err)
    finally:
        try:
            await asyncio.wait_for(env.close(), limits.step_timeout_s)
        except Exception:  # noqa: BLE001 - closing is best effort; the episode's outcome stands
            pass
    episode.version_end = max([v for v in episode.versions if v >= 0], default=episode.version_start)
    episode.env_s = time.perf_counter() - started - episode.generate_s
    return episode


async def _play(engine, chat: ChatFormat, env, sample, limits: EpisodeLimits, request_id: str,
                system_prompt: str | None, episode: Episode) -> None:  # fmt: skip
    messages = _messages(await _env_call(env.reset(sample), "reset", limits), "reset")
    if system_prompt and (not messages or messages[0].get("role") != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    episode.prompt_ids = chat.opening(messages)
    if len(episode.prompt_ids) >= limits.max_tokens:
        raise EpisodeFailed(f"the opening has {len(episode.prompt_ids)} tokens, no room under {limits.max_tokens}")
    for turn in range(limits.max_turns):
        budget = min(limits.turn_tokens, limits.max_tokens - len(episode.prompt_ids) - len(episode.response_ids))
        if budget <= 0:
            episode.end = "length"
            return
        t0 = time.perf_counter()
        [c] = await engine.generate(episode.prompt_ids + episode.response_ids, 1, f"{request_id}/t{turn}",
                                    max_tokens=budget)  # fmt: skip
        episode.generate_s += time.perf_counter() - t0
        episode.add(c.token_ids, c.logprobs, c.versions, trained=True)
        episode.turns += 1
        text = chat.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        step = await _env_call(env.step(text), "step", limits)
        if not isinstance(step, EnvStep):
            raise EpisodeFailed(f"step returned {type(step).__name__}, not an EnvStep")
        reward = _reward(step.reward)
        episode.step_rewards.append(reward)
        episode.reward += reward
        episode.tool_calls += int(step.info.get("tool_calls", 0))
        episode.tool_errors += int(step.info.get("tool_errors", 0))
        if step.done:
            episode.end = "done"
            return
        appended = chat.after_turn(c.token_ids, _messages(step.observation, "step"))
        if len(episode.prompt_ids) + len(episode.response_ids) + len(appended) >= limits.max_tokens:
            episode.end = "length"
            return
        episode.add(appended, [0.0] * len(appended), [-1] * len(appended), trained=False)
    episode.end = "max_turns"


async def _env_call(call: Awaitable, what: str, limits: EpisodeLimits) -> Any:
    try:
        return await asyncio.wait_for(call, limits.step_timeout_s)
    except TimeoutError:
        raise EpisodeFailed(
            f"environment {what} took longer than task.step_timeout_s={limits.step_timeout_s:g}s"
        ) from None
    except asyncio.CancelledError:
        raise
    except Exception as err:  # noqa: BLE001 - environment code: any failure ends only this episode
        raise EpisodeFailed(f"environment {what} raised {type(err).__name__}: {err}") from err


def _messages(value: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        shown = str(value)[:80]
        raise EpisodeFailed(f"environment {what} returned {shown!r}, not a list of {{role, content}} messages")
    return [dict(m) for m in value]


def _reward(value: Any) -> float:
    try:
        reward = float(value)
    except (TypeError, ValueError):
        raise EpisodeFailed(f"environment reward {value!r} is not a number") from None
    if not math.isfinite(reward):
        raise EpisodeFailed(f"environment reward {value!r} is not finite")
    return reward
