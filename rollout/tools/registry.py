"""Tools by name, as `task.tools` lists them: "calculator", "python", "mcp:<server command line>".

`check_tool_specs` runs at config validation, so a typo fails before any actor starts; opening
happens once per rollout actor, because an MCP server is a process. The MCP client is imported
only when an MCP tool is opened: validating a config should not load it.
"""

from __future__ import annotations

from collections.abc import Callable

from rollout.tools.base import Tool
from rollout.tools.calculator import Calculator
from rollout.tools.python_sandbox import PythonSandbox

BUILTIN: dict[str, Callable[[], Tool]] = {"calculator": Calculator, "python": PythonSandbox}
MCP_PREFIX = "mcp:"
CHOICES = f"{', '.join(BUILTIN)}, or '{MCP_PREFIX}<server command line>'"


def check_tool_specs(specs: list[str]) -> None:
    """ValueError for a spec no tool answers to, or a built-in named twice; starts nothing."""
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, str):
            raise ValueError(f"a tool is named by a string ({CHOICES}), got {spec!r}")
        if spec.startswith(MCP_PREFIX):
            if not spec[len(MCP_PREFIX) :].strip():
                raise ValueError(f"tool {spec!r} names no MCP server command, e.g. 'mcp:python my_server.py'")
        elif spec not in BUILTIN:
            raise ValueError(f"unknown tool {spec!r}; the tools are {CHOICES}")
        if spec in seen:
            raise ValueError(f"tool {spec!r} is listed twice")
        seen.add(spec)


async def open_tools(specs: list[str], timeout_s: float = 30.0) -> list[Tool]:
    """The tools `specs` name, opened; if one fails to open, those already open are closed again."""
    check_tool_specs(specs)
    tools: list[Tool] = []
    try:
        for spec in specs:
            if spec.startswith(MCP_PREFIX):
                from rollout.tools.mcp_tools import open_mcp_tools

                tools += await open_mcp_tools(spec[len(MCP_PREFIX) :], timeout_s=timeout_s)
            else:
                tools.append(BUILTIN[spec]())
        names = [t.name for t in tools]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two tools are named {', '.join(map(repr, duplicates))}; tool names must be unique")
    except BaseException:
        await close_tools(tools)
        raise
    return tools


async def close_tools(tools: list[Tool]) -> None:
    for tool in tools:
        try:
            await tool.close()
        except Exception:  # noqa: BLE001 - closing: the other tools still close
            pass
