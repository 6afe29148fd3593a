"""Tools in front of any environment: a turn that calls tools gets their results back as tool
messages; a turn that calls none goes to the environment.

Calls run one after another in the order written, each under `task.step_timeout_s`. A bad call
(unknown tool, arguments that are not JSON, a tool's refusal, a tool that crashes or hangs)
becomes a tool message starting with "error:", which the model reads like any result: the
episode goes on, and the dashboard counts it under tool errors.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rollout.envs.base import Environment, EnvStep
from rollout.tasks.base import TaskSample
from rollout.tools.base import Tool, ToolCall, ToolError
from rollout.tools.calls import parse_tool_calls


class ToolEnv:
    def __init__(self, inner: Environment, tools: list[Tool], timeout_s: float):
        self.inner, self.timeout_s = inner, timeout_s
        self.tools = {t.name: t for t in tools}

    async def reset(self, sample: TaskSample) -> list[dict[str, Any]]:
        return await self.inner.reset(sample)

    async def step(self, turn: str) -> EnvStep:
        calls, malformed = parse_tool_calls(turn)
        if not calls and not malformed:
            return await self.inner.step(turn)
        results = [f"error: {why}" for why in malformed]
        for call in calls:
            results.append(await self._call(call))
        errors = sum(r.startswith("error:") for r in results)
        return EnvStep(
            observation=[{"role": "tool", "content": r} for r in results],
            info={"tool_calls": len(calls) + len(malformed), "tool_errors": errors},
        )

    async def _call(self, call: ToolCall) -> str:
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: no tool named {call.name!r}; the tools are {', '.join(sorted(self.tools)) or 'none'}"
        try:
            return str(await asyncio.wait_for(tool.call(call.arguments), self.timeout_s))
        except TimeoutError:
            return f"error: {call.name} took longer than {self.timeout_s:g}s"
        except ToolError as err:
            return f"error: {err}"
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - a broken tool is the model's tool error, not a crash
            return f"error: {call.name} failed: {type(err).__name__}: {err}"

    async def close(self) -> None:
        await self.inner.close()
