"""An OpenAI-compatible chat endpoint in front of a rollout engine, so that agent code written
with the OpenAI SDK runs unchanged inside an episode (`task.env: openai_agent:module:function`).

One server per rollout actor, started on first use in the actor's event loop, bound to
127.0.0.1 on an ephemeral port unless `host` names another address (an agent running on
another machine of the cluster). Every episode registers an `AgentSession` and gets a fresh
random key; a request must carry it as `Authorization: Bearer <key>`, anything else is a 401
that touches no episode, and the key is revoked when the episode ends. The key is what routes
a request to its episode, so concurrent episodes never see each other's conversations.

`POST /v1/chat/completions` answers with a standard `chat.completion` (tool calls in OpenAI
form when the request gave `tools`); `GET /v1/models` lists the one model served. The
request's sampling fields (temperature, top_p, seed, stop, penalties, logprobs) are ignored:
the tokens must come from the run's behaviour policy, whose log-probs the objective uses, so
they are sampled with the run's settings (rollout.temperature, top_p, top_k). `n` must be 1
and `stream` false: an episode records one conversation, whole.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from aiohttp import web

from rollout.agent_messages import RequestError
from rollout.agent_session import AgentSession

log = logging.getLogger(__name__)

MODEL = "vespo-policy"  # the name /v1/models lists; a request may name any model


class AgentServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, model: str = MODEL):
        self.host, self.port, self.model = host, port, model
        self.sessions: dict[str, AgentSession] = {}
        self._runner: web.AppRunner | None = None
        self._starting = asyncio.Lock()

    async def ensure_started(self) -> AgentServer:
        """Started once, however many episodes ask at the same time."""
        async with self._starting:
            if self._runner is None:
                await self.start()
        return self

    async def start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]
        log.info("OpenAI-compatible endpoint for agent episodes at %s", self.base_url)

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else "[::1]" if self.host == "::" else self.host
        return f"http://{host}:{self.port}/v1"

    def register(self, session: AgentSession) -> str:
        """A fresh key for `session`: the only way to reach it."""
        key = secrets.token_urlsafe(32)
        self.sessions[key] = session
        return key

    def revoke(self, key: str) -> None:
        session = self.sessions.pop(key, None)
        if session is not None:
            session.close()

    async def close(self) -> None:
        for key in list(self.sessions):
            self.revoke(key)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _session(self, request: web.Request) -> AgentSession:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        session = self.sessions.get(key.strip()) if scheme.lower() == "bearer" else None
        if session is None:
            raise RequestError(401, "missing or invalid key: each episode's client carries its own")
        return session

    async def _completions(self, request: web.Request) -> web.Response:
        try:
            session = self._session(request)
            body = await _body(request)
            if body.get("stream"):
                raise RequestError(400, "streaming is not supported")
            if body.get("n") not in (None, 1):
                raise RequestError(400, "n must be 1: an episode records one conversation")
            return web.json_response(await session.complete(body, self.model))
        except RequestError as err:
            return _error(err)

    async def _models(self, request: web.Request) -> web.Response:
        try:
            self._session(request)
        except RequestError as err:
            return _error(err)
        model = {"id": self.model, "object": "model", "created": 0, "owned_by": "vespo"}
        return web.json_response({"object": "list", "data": [model]})


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


def _error(err: RequestError) -> web.Response:
    kind = {401: "authentication_error", 500: "server_error"}.get(err.status, "invalid_request_error")
    code = "invalid_api_key" if err.status == 401 else None
    return web.json_response(
        {"error": {"message": err.message, "type": kind, "param": None, "code": code}}, status=err.status
    )
