"""An episode played by the user's agent function through the OpenAI-compatible server.

The agent gets an OpenAI client whose base URL is the actor's server and whose key reaches
this episode only; it calls the model as often as it likes (each call a turn, within the
episode's limits) and returns the episode's reward. An `async def` agent gets an
`openai.AsyncOpenAI` client; a plain function runs in a thread with an `openai.OpenAI` one (a
thread cannot be stopped: past the episode timeout its key is revoked and its calls fail).

The outcome mirrors `rollout.episode.run_episode`: the agent raising, overrunning
`task.episode_timeout_s` or returning something that is not a finite number ends the episode
with `error` set, and it never trains. A request refused for the turn or token budget ends the
episode with what it recorded ("max_turns" / "length"): the agent may still return a reward;
if it raises (the refusal's BadRequestError, most likely) the reward is 0 and the episode
trains like any truncated one. An engine failure propagates, as in `run_episode`.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import time
from typing import Any

from rollout.agent_session import AgentSession
from rollout.engine import Engine
from rollout.episode import Episode, EpisodeLimits
from rollout.openai_server import AgentServer
from rollout.tasks.base import TaskSample


async def run_agent_episode(engine: Engine, tokenizer, server: AgentServer, agent, sample: TaskSample,
                            limits: EpisodeLimits, request_id: str) -> Episode:  # fmt: skip
    session = AgentSession(engine, tokenizer, limits, request_id)
    key = server.register(session)
    started = time.perf_counter()
    playing = asyncio.ensure_future(_call(agent, server.base_url, key, sample, limits))
    playing.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, even when not waited for
    broken = asyncio.ensure_future(session.engine_failed.wait())
    try:
        done, _ = await asyncio.wait({playing, broken}, timeout=limits.episode_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    finally:
        server.revoke(key)
        broken.cancel()
        playing.cancel()
    if session.engine_error is not None:
        raise session.engine_error
    ep = session.episode
    ep.end, ep.error = _outcome(playing, done, session, limits)
    ep.version_end = max([v for v in ep.versions if v >= 0], default=ep.version_start)
    ep.env_s = time.perf_counter() - started - ep.generate_s
    return ep


def _outcome(playing: asyncio.Future, done: set, session: AgentSession, limits: EpisodeLimits
             ) -> tuple[str, str | None]:  # fmt: skip
    """(end, error) once the agent has returned, raised or run out of time."""
    ep = session.episode
    if playing not in done:
        return "error", f"episode took longer than task.episode_timeout_s={limits.episode_timeout_s:g}s"
    if session.failure:
        return "error", session.failure
    if playing.cancelled():
        return "error", "the agent was cancelled"
    err = playing.exception()
    limited = ep.end in ("length", "max_turns")
    if err is not None and not limited:
        return "error", f"agent raised {type(err).__name__}: {str(err)[:300]}"
    if not ep.turns:
        return "error", "the agent returned without asking for a completion: nothing to train on"
    if err is None:
        try:
            ep.reward = _reward(playing.result())
        except ValueError as why:
            return "error", str(why)
        ep.step_rewards.append(ep.reward)
    return ep.end or "done", None


async def _call(agent, base_url: str, key: str, sample: TaskSample, limits: EpisodeLimits) -> Any:
    import openai

    options = {"base_url": base_url, "api_key": key, "max_retries": 0, "timeout": limits.episode_timeout_s}
    if inspect.iscoroutinefunction(agent):
        async with openai.AsyncOpenAI(**options) as client:
            return await agent(client, sample)

    def in_thread() -> Any:
        with openai.OpenAI(**options) as client:
            return agent(client, sample)

    return await asyncio.to_thread(in_thread)


def _reward(value: Any) -> float:
    if not isinstance(value, numbers.Real):
        raise ValueError(f"agent returned {str(value)[:80]!r}, not a number (the episode's reward)")
    if not math.isfinite(value):
        raise ValueError(f"agent reward {value!r} is not finite")
    return float(value)
