"""The tool interface: a name, an OpenAI-style function schema, and an async call.

A tool never raises anything but `ToolError` for a bad call, and its message is what the model
reads back, so it says what went wrong in one line. Anything else a tool raises is a bug of the
tool; the episode runner turns it into a tool error too, so one broken tool never stops a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class ToolError(Exception):
    """A call the tool refused or could not finish; the message goes back to the model."""


@dataclass(frozen=True)
class ToolCall:
    """One call parsed from the model's text."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


class Tool(Protocol):
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object

    async def call(self, arguments: dict[str, Any]) -> str: ...

    async def close(self) -> None: ...


def schema(tool: Tool) -> dict[str, Any]:
    """The tool as chat templates and the OpenAI API take it (`tools=[...]`)."""
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
    }
