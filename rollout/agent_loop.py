"""The multi-turn side of a rollout actor (`task.name: env`): what it needs to run episodes
(the environment factory, the tools, the chat format, the limits) and the group of n episodes
one prompt becomes, as trajectories.

Tools are opened once per actor (an MCP server is a process) and shared by its episodes; every
episode gets a fresh environment from the factory.
"""

from __future__ import annotations

import asyncio

from buffer.trajectory import Trajectory
from rollout.chat_format import ChatFormat
from rollout.config import RolloutConfig
from rollout.engine import Engine
from rollout.envs.base import EnvFactory
from rollout.envs.registry import make_env_factory
from rollout.envs.tool_env import ToolEnv
from rollout.episode import Episode, EpisodeLimits, run_episode
from rollout.records import PromptItem
from rollout.tasks.base import TaskConfig, TaskSample
from rollout.tools.base import Tool, schema


class AgentLoop:
    def __init__(self, task: TaskConfig, rollout: RolloutConfig, envs: EnvFactory, tools: list[Tool], tokenizer):
        self.task, self.envs, self.tools = task, envs, tools
        self.chat = ChatFormat(tokenizer, [schema(t) for t in tools])
        self.server = None  # task.env openai_agent: the OpenAI-compatible endpoint, started on first use
        self.limits = EpisodeLimits(
            max_turns=task.max_turns,
            max_tokens=rollout.max_model_len,
            turn_tokens=rollout.max_new_tokens,
            step_timeout_s=task.step_timeout_s,
            episode_timeout_s=task.episode_timeout_s,
        )

    @classmethod
    async def open(cls, task: TaskConfig, rollout: RolloutConfig, tokenizer) -> AgentLoop:
        from rollout.tools.registry import open_tools  # MCP's client is imported only when tools are

        envs = make_env_factory(task)
        tools = await open_tools(task.tools, timeout_s=task.step_timeout_s)
        return cls(task, rollout, envs, tools, tokenizer)

    def environment(self):
        env = self.envs.make()
        return ToolEnv(env, self.tools, self.task.step_timeout_s) if self.tools else env

    async def group(
        self, engine: Engine, item: PromptItem, n: int, request_id: str, engine_id: str
    ) -> list[Trajectory]:
        """n episodes of one item, played concurrently."""
        sample = TaskSample(item.sample_id, item.text, item.answer, chat=False, data_source=item.data_source,
                            extra_info=item.extra_info)  # fmt: skip
        if getattr(self.envs, "agent", None) is not None:
            episodes = await self._agent_episodes(engine, self.envs.original(sample), n, request_id)
        else:
            episodes = await asyncio.gather(*(
                run_episode(engine, self.chat, self.environment(), sample, self.limits, f"{request_id}/{i}",
                            self.task.system_prompt)
                for i in range(n)
            ))  # fmt: skip
        return [trajectory(item, i, n, ep, engine_id) for i, ep in enumerate(episodes)]

    async def _agent_episodes(self, engine: Engine, sample: TaskSample, n: int, request_id: str) -> list[Episode]:
        """n episodes played by the user's OpenAI-SDK agent (task.env openai_agent)."""
        from rollout.openai_agent_episode import run_agent_episode
        from rollout.openai_server import AgentServer

        if self.server is None:
            self.server = AgentServer(host=self.envs.host)
        server = await self.server.ensure_started()
        return await asyncio.gather(*(
            run_agent_episode(engine, self.chat.tokenizer, server, self.envs.agent, sample, self.limits,
                              f"{request_id}/{i}")
            for i in range(n)
        ))  # fmt: skip

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None
        for tool in self.tools:
            try:
                await tool.close()
            except Exception:  # noqa: BLE001 - shutting down: the other tools still close
                pass


def trajectory(item: PromptItem, i: int, n: int, ep: Episode, engine_id: str) -> Trajectory:
    extra = {"sample_id": item.sample_id, "answer": item.answer, **item.extra, "turns": ep.turns,
             "tool_calls": ep.tool_calls, "tool_errors": ep.tool_errors, "episode_end": ep.end}  # fmt: skip
    if ep.error:
        extra["reward_error"] = f"episode failed: {ep.error}"  # excluded from training like a failed reward
    return Trajectory(
        traj_id=f"{item.group_id}/{i}",
        group_id=item.group_id,
        group_size=n,
        prompt_ids=ep.prompt_ids,
        response_ids=ep.response_ids,
        behavior_logprobs=ep.logprobs,
        token_versions=ep.versions,
        loss_mask=ep.mask,
        version_start=ep.version_start,
        version_end=ep.version_end,
        reward=ep.reward,
        finish_reason=ep.finish_reason,
        engine_id=engine_id,
        timings={"generate": ep.generate_s, "env": ep.env_s},
        extra=extra,
    )
