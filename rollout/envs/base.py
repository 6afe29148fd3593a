"""The environment interface a multi-turn episode talks to.

An episode: `reset(sample)` gives the opening messages; then the model speaks a turn, and
`step(turn_text)` answers with the messages to append (a tool result, an observation, the next
user turn), a reward and whether the episode is over. Rewards may come at any step; the
episode's reward is their sum. The runner (`rollout.episode`) owns the limits: per-step and
whole-episode timeouts, a turn limit and the token budget. An environment that raises, hangs
or returns something that is not an `EnvStep` ends its episode with a recorded reason, and
that episode never trains.

Third-party environments are synchronous more often than not: adapters run them in a thread
(`asyncio.to_thread`) so a slow one never blocks generation and the runner's timeouts hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from rollout.tasks.base import TaskSample


@dataclass
class EnvStep:
    observation: list[dict[str, Any]] = field(default_factory=list)  # chat messages to append
    reward: float = 0.0
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)  # counts for the dashboard: tool_calls, tool_errors


class Environment(Protocol):
    """One episode's environment: made fresh for every episode, closed after it."""

    async def reset(self, sample: TaskSample) -> list[dict[str, Any]]: ...

    async def step(self, turn: str) -> EnvStep: ...

    async def close(self) -> None: ...


class EnvFactory(Protocol):
    """What `task.env` names: where the episodes' opening items come from, and a fresh
    environment per episode. Built once per process (controller and each rollout actor) from
    the task config; `samples` must be the same in every process (seeded, not random)."""

    name: str

    def samples(self, split: str) -> list[TaskSample]: ...

    def make(self) -> Environment: ...
