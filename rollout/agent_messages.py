"""Chat messages as an OpenAI request carries them, reduced to what the episode's record and the
chat template need, and compared with the conversation the episode holds.

An agent repeats its whole conversation in every request. The episode records one conversation
(its tokens, as sampled), so a request is taken only when it repeats what the episode holds and
adds messages after vespo's last reply; anything else would be a different conversation, and
training on a record that is not what the agent saw would train the wrong thing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from rollout.tools.base import ToolCall
from rollout.tools.calls import CLOSE, OPEN, parse_tool_calls

ROLES = ("system", "developer", "user", "assistant", "tool")
_BLOCK = re.compile(re.escape(OPEN) + r".*?(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)  # as parse_tool_calls reads
REWRITE = "an episode records one conversation, so a request may only add messages after vespo's last reply"


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP status, the message one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Message:
    role: str
    content: str
    calls: list[ToolCall] = field(default_factory=list)  # an assistant message's tool calls

    def template(self) -> dict[str, Any]:
        """The message as chat templates take it (arguments as objects, as Hermes templates expect)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        if self.calls:
            out["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in self.calls]  # fmt: skip
        return out


@dataclass
class Reply:
    """A turn vespo produced: its text, and that text split the OpenAI way (calls apart)."""

    text: str
    content: str
    calls: list[ToolCall]
    malformed: int = 0  # <tool_call> blocks that are not calls

    @classmethod
    def parse(cls, text: str, tools: bool) -> Reply:
        if not tools or OPEN not in text:
            return cls(text, text, [])
        calls, malformed = parse_tool_calls(text)
        return cls(text, _BLOCK.sub("", text).strip() if calls else text, calls, len(malformed))

    def matches(self, sent: Message) -> str | None:
        """Why `sent` is not this reply as the agent may send it back (content and/or
        tool_calls), or None when it is."""
        if sent.role != "assistant":
            return f"role {sent.role!r} where vespo's reply (assistant) was"
        if sent.calls and _call_keys(sent.calls) != _call_keys(self.calls):
            return "tool_calls differ from those vespo returned"
        content = sent.content.strip()
        if content in (self.content.strip(), self.text.strip()) or (not content and sent.calls):
            return None
        return "content differs from vespo's reply"


def parse_messages(value: Any) -> list[Message]:
    """The request's `messages`, with a 400 naming the first one that is not a text chat message."""
    if not isinstance(value, list) or not value:
        raise RequestError(400, "messages must be a non-empty list")
    return [_message(m, i) for i, m in enumerate(value)]


def _message(m: Any, i: int) -> Message:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise RequestError(400, f"messages[{i}] needs a role among {', '.join(ROLES)}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise RequestError(400, f"messages[{i}]: only text content is supported")
        content = "".join(str(p.get("text", "")) for p in content)
    if content is not None and not isinstance(content, str):
        raise RequestError(400, f"messages[{i}].content must be text")
    calls = [_call(c, i) for c in m.get("tool_calls") or []] if m["role"] == "assistant" else []
    return Message(m["role"], content or "", calls)


def _call(c: Any, i: int) -> ToolCall:
    function = c.get("function") if isinstance(c, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(400, f"messages[{i}].tool_calls: each needs function.name")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = {"_raw": arguments}
    return ToolCall(function["name"], arguments if isinstance(arguments, dict) else {"_raw": arguments})


def _call_keys(calls: list[ToolCall]) -> list[tuple[str, str]]:
    return [(c.name, json.dumps(c.arguments, sort_keys=True)) for c in calls]


def new_messages(sent: list[Message], history: list[Message | Reply]) -> list[Message]:
    """The messages `sent` adds after the episode's conversation `history` (which ends with
    vespo's last reply), or a 400 saying where it departs from it."""
    if len(sent) < len(history):
        raise RequestError(400, f"the request has {len(sent)} messages, the episode's conversation {len(history)} "
                                f"(vespo's last reply included); {REWRITE}")  # fmt: skip
    for i, (got, held) in enumerate(zip(sent, history, strict=False)):
        why = held.matches(got) if isinstance(held, Reply) else _same(got, held)
        if why:
            raise RequestError(400, f"messages[{i}] rewrites the episode's conversation: {why}; {REWRITE}")
    return sent[len(history) :]


def _same(got: Message, held: Message) -> str | None:
    if got.role != held.role:
        return f"role {got.role!r} where {held.role!r} was"
    if got.content != held.content:
        return "content differs"
    if got.role == "assistant" and _call_keys(got.calls) != _call_keys(held.calls):
        return "tool_calls differ"
    return None


def reply_json(reply: Reply, turn: int, finish: str) -> dict[str, Any]:
    """The reply as an OpenAI `choices[0].message`: tool calls apart, arguments as JSON text."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content or (None if reply.calls else "")}
    if reply.calls:
        message["tool_calls"] = [
            {"id": f"call_{turn}_{k}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for k, c in enumerate(reply.calls)
        ]  # fmt: skip
    return {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
