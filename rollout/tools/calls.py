"""Tool calls in the text a model writes, and tools described to a model whose chat template
cannot render them.

The format is the one Hermes-style templates (Qwen2.5, Qwen3 and many others) render with
`tools=` and vLLM's `hermes` parser reads: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
A template that renders `tools=` itself describes them in its own words; for one that does
not (SmolLM2's, the tiny models'), `tool_system_prompt` describes them in this format.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rollout.tools.base import ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[list[ToolCall], list[str]]:
    """The calls in a model's turn, and a one-line reason for each block that is not a call
    (the model reads those back as tool errors). No `<tool_call>` at all: ([], [])."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    for match in _CALL.finditer(text):
        body = match.group(1).strip()
        try:
            data = json.loads(body)
        except json.JSONDecodeError as err:
            errors.append(f"tool call is not JSON ({err.msg} at character {err.pos}): {body[:80]!r}")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            errors.append(f'tool call needs {{"name": ..., "arguments": {{...}}}}, got {body[:80]!r}')
            continue
        arguments = data.get("arguments", data.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments object as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            errors.append(f"tool call {data['name']!r}: arguments must be an object, got {arguments!r:.80}")
            continue
        calls.append(ToolCall(data["name"], arguments))
    return calls, errors


def format_tool_call(call: ToolCall) -> str:
    return f"{OPEN}{json.dumps({'name': call.name, 'arguments': call.arguments})}{CLOSE}"


def tool_system_prompt(tools: list[dict[str, Any]]) -> str:
    """Tools described for a template that does not render `tools=`."""
    listed = "\n".join(json.dumps(t["function"]) for t in tools)
    return (
        f"You may call these tools:\n{listed}\n"
        f'To call one, write {OPEN}{{"name": <tool name>, "arguments": <arguments object>}}{CLOSE}; '
        "its result comes back in a tool message."
    )
