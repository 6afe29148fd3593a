"""One agent episode as the OpenAI-compatible server sees it: each completion request extends
the episode's conversation, and its tokens are stitched into the episode's record.

The first request's messages (and tools) are the opening, rendered once through the chat
template. A later request repeats the conversation, vespo's last reply included, and only the
messages it adds after that reply are rendered (`ChatFormat.after_turn`) and appended with
loss mask 0. The model's turns stay the tokens it sampled, with their log-probs and versions:
the agent reads them as text, the learner trains on them as sampled. Requests of one episode
are served one at a time, in the order they arrive.

The episode's limits are the runner's: at most `task.max_turns` completions, `rollout.max_new_tokens`
per completion (less if the request asks for less), `rollout.max_model_len` for the whole
conversation. A request past them is refused and ends the episode (end "max_turns" or
"length"); what was recorded before it still trains. An engine failure is not the episode's
fault: it is kept for the runner to raise (the group is then retried).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rollout.agent_messages import Message, Reply, RequestError, new_messages, parse_messages, reply_json
from rollout.chat_format import ChatFormat, ChatFormatError
from rollout.engine import Engine
from rollout.episode import Episode, EpisodeLimits


class AgentSession:
    def __init__(self, engine: Engine, tokenizer, limits: EpisodeLimits, request_id: str):
        self.engine, self.tokenizer, self.limits, self.request_id = engine, tokenizer, limits, request_id
        self.episode = Episode(version_start=engine.version, version_end=engine.version)
        self.chat: ChatFormat | None = None
        self.tools: list[dict[str, Any]] | None = None
        self.history: list[Message | Reply] = []  # the conversation as the agent must repeat it
        self.last_turn: list[int] = []
        self.failure: str | None = None  # why the episode cannot train, set by a refused first request
        self.engine_error: BaseException | None = None
        self.engine_failed = asyncio.Event()
        self.closed = False
        self._lock = asyncio.Lock()
        self._generating: asyncio.Task | None = None

    def close(self) -> None:
        """The episode is over: later requests are refused and a generation in flight is stopped."""
        self.closed = True
        if self._generating is not None:
            self._generating.cancel()

    async def complete(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        """A chat.completion for the request `body`, its tokens recorded in the episode."""
        async with self._lock:
            if self.closed:
                raise RequestError(401, "this episode has ended; its key is no longer valid")
            if self.episode.end:
                raise RequestError(400, f"this episode has ended ({self.episode.end}); no more completions")
            messages = parse_messages(body.get("messages"))
            tools = _tools(body.get("tools"))
            appended, added = self._extend(messages, tools)
            budget = self._budget(len(appended), body)
            context = self.episode.prompt_ids + self.episode.response_ids + appended
            completion = await self._generate(context, budget)
            self._record(appended, added, completion)
            reply = Reply.parse(self.tokenizer.decode(completion.token_ids, skip_special_tokens=True), bool(tools))
            self.history.append(reply)
            self.episode.tool_calls += len(reply.calls)
            self.episode.tool_errors += reply.malformed
            finish = "tool_calls" if reply.calls else "length" if completion.finish_reason == "length" else "stop"
            n_out = len(completion.token_ids)
            return {
                "id": f"chatcmpl-{self.request_id.replace('/', '-')}-{self.episode.turns}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [reply_json(reply, self.episode.turns, finish)],
                "usage": {"prompt_tokens": len(context), "completion_tokens": n_out,
                          "total_tokens": len(context) + n_out},
            }  # fmt: skip

    def _extend(self, messages: list[Message], tools) -> tuple[list[int], list[Message]]:
        """The tokens this request adds before generation (the opening, or the messages after
        vespo's last reply) and those messages; nothing is recorded yet."""
        if not self.history:  # the first request: its messages and tools are the opening
            try:
                self.chat = ChatFormat(self.tokenizer, tools)
            except ChatFormatError as err:
                raise RequestError(400, str(err)) from None
            self.tools = tools
            return self.chat.opening([m.template() for m in messages]), messages
        if tools != self.tools:
            raise RequestError(400, "tools differ from the episode's first request (they are part of its prompt)")
        added = new_messages(messages, self.history)
        try:
            return self.chat.after_turn(self.last_turn, [m.template() for m in added]), added
        except ChatFormatError as err:
            raise RequestError(400, str(err)) from None

    def _budget(self, n_appended: int, body: dict[str, Any]) -> int:
        limits, ep = self.limits, self.episode
        asked = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
        if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 1):
            raise RequestError(400, f"max_tokens must be a positive integer, got {asked!r}")
        if ep.turns >= limits.max_turns:
            ep.end = "max_turns"
            raise RequestError(400, f"this episode has had its task.max_turns={limits.max_turns} completions")
        room = limits.max_tokens - len(ep.prompt_ids) - len(ep.response_ids) - n_appended
        if room <= 0:
            ep.end = "length"
            if not ep.turns:
                self.failure = f"the opening has {n_appended} tokens, no room under {limits.max_tokens}"
            raise RequestError(400, f"the conversation would have {limits.max_tokens - room} tokens, past this "
                                    f"episode's budget of {limits.max_tokens} (rollout.max_model_len)")  # fmt: skip
        return min(limits.turn_tokens, room, asked if asked is not None else limits.turn_tokens)

    async def _generate(self, context: list[int], budget: int):
        request_id = f"{self.request_id}/t{self.episode.turns}"
        self._generating = asyncio.ensure_future(self.engine.generate(context, 1, request_id, max_tokens=budget))
        started = time.perf_counter()
        try:
            [completion] = await self._generating
            return completion
        except asyncio.CancelledError:
            if self.closed and not asyncio.current_task().cancelling():
                raise RequestError(401, "this episode has ended; its key is no longer valid") from None
            raise
        except Exception as err:  # noqa: BLE001 - the engine's failure, not the agent's: the runner raises it
            self.engine_error = err
            self.engine_failed.set()
            raise RequestError(500, f"the engine failed: {type(err).__name__}") from None
        finally:
            self._generating = None
            self.episode.generate_s += time.perf_counter() - started

    def _record(self, appended: list[int], added: list[Message], completion) -> None:
        ep, turn = self.episode, completion.token_ids
        if not self.history:
            ep.prompt_ids = appended
        else:
            ep.add(appended, [0.0] * len(appended), [-1] * len(appended), trained=False)
        ep.add(turn, completion.logprobs, completion.versions, trained=True)
        ep.turns += 1
        self.history.extend(added)
        self.last_turn = list(turn)


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """The request's `tools`: OpenAI function tools, or None."""
    if not value:
        return None
    if not isinstance(value, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
        for t in value
    ):
        raise RequestError(400, 'tools must be a list of {"type": "function", "function": {"name": ...}}')
    return value
