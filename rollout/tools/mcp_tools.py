"""The tools of an MCP server (Model Context Protocol, over stdio) behind the `Tool` interface.

One server process serves all of its tools, so they share one connection. The MCP client keeps
anyio task groups open for as long as the session lives, and those must be entered and left by
the same task; a task of the connection's own therefore holds the session, and calls from any
task of the same event loop go through it. The server stops when the last of its tools closes
(or `McpConnection.close`), and the client's shutdown kills its whole process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import mcp_types
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from rollout.tools.base import Tool, ToolError

log = logging.getLogger(__name__)


class McpConnection:
    """One server process and its session, shared by the server's tools."""

    def __init__(self, command: str, timeout_s: float):
        argv = shlex.split(command)
        if not argv:
            raise ValueError("an MCP server needs a command line, e.g. 'mcp:python my_server.py'")
        self.command, self.argv, self.timeout_s = command, argv, timeout_s
        self.client: Client | None = None
        self.users = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self) -> list[mcp_types.Tool]:
        """Start the server and list its tools; the server is stopped again if either fails."""
        ready: asyncio.Future[list[mcp_types.Tool]] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._serve(ready), name=f"mcp server: {self.command}")
        try:
            return await asyncio.wait_for(asyncio.shield(ready), self.timeout_s)
        except TimeoutError:
            raise TimeoutError(f"MCP server {self.command!r} did not list its tools in {self.timeout_s:g} s") from None
        except Exception as e:
            raise RuntimeError(f"MCP server {self.command!r} failed to start: {_leaf(e)!r}") from e
        finally:
            if not ready.done() or ready.exception() is not None:
                await self._cancel()

    async def _serve(self, ready: asyncio.Future[list[mcp_types.Tool]]) -> None:
        params = StdioServerParameters(command=self.argv[0], args=self.argv[1:])
        try:
            with _server_log() as errlog:
                client = Client(stdio_client(params, errlog=errlog), read_timeout_seconds=self.timeout_s)
                async with client:
                    tools: list[mcp_types.Tool] = []
                    cursor = None
                    while True:
                        page = await client.list_tools(cursor=cursor)
                        tools += page.tools
                        if not (cursor := page.next_cursor):
                            break
                    self.client = client
                    ready.set_result(tools)
                    await self._stop.wait()
        except Exception as e:  # noqa: BLE001 - reported to start(), or logged once the tools are in use
            if not ready.done():
                ready.set_exception(e)
            else:
                log.warning("MCP server %r stopped: %r", self.command, _leaf(e))
        finally:
            self.client = None

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        client = self.client
        if client is None:
            raise ToolError(f"{name}: the MCP server ({self.command}) is not running")
        try:
            result = await client.call_tool(name, arguments)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the server or transport did, the model reads one line
            raise ToolError(f"{name}: {type(e).__name__}: {e}".splitlines()[0]) from None
        text = _text(result)
        if result.is_error:
            raise ToolError(f"{name}: {' '.join(text.split())[:2000] or 'the tool failed'}")
        return text

    async def close(self) -> None:
        """Stop the server (idempotent): an orderly shutdown of the client, cancelled if it hangs."""
        self._stop.set()
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), self.timeout_s)
            except TimeoutError:
                await self._cancel()

    async def _cancel(self) -> None:
        """Cancelling the owning task unwinds the client, whose shielded shutdown kills the server."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class McpTool:
    """One tool of a connection; closing the last of them stops the server."""

    def __init__(self, connection: McpConnection, spec: mcp_types.Tool):
        self.connection = connection
        self.name = spec.name
        self.description = spec.description or spec.title or spec.name
        self.parameters: dict[str, Any] = spec.input_schema or {"type": "object", "properties": {}}
        self._closed = False
        connection.users += 1

    async def call(self, arguments: dict[str, Any]) -> str:
        if self._closed:
            raise ToolError(f"{self.name}: closed")
        return await self.connection.call(self.name, arguments if isinstance(arguments, dict) else {})

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.connection.users -= 1
        if self.connection.users <= 0:
            await self.connection.close()


async def open_mcp_tools(command: str, timeout_s: float = 30.0) -> list[Tool]:
    """Start the MCP server `command` (a shell-style command line) and return its tools."""
    connection = McpConnection(command, timeout_s)
    specs = await connection.start()
    tools = [McpTool(connection, spec) for spec in specs]
    if not tools:
        await connection.close()
    return list(tools)


def _leaf(e: BaseException) -> BaseException:
    """The first real error inside anyio's exception groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def _text(result: mcp_types.CallToolResult) -> str:
    parts = []
    for block in result.content:
        text = getattr(block, "text", None)
        parts.append(text if isinstance(text, str) else f"[{block.type} content]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    return "\n".join(parts)


@contextlib.contextmanager
def _server_log() -> Iterator[TextIO]:
    """Where the server's stderr goes: to ours where that is a real file (a test's capture may not be)."""
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        with open(os.devnull, "w") as devnull:
            yield devnull
    else:
        yield sys.stderr
