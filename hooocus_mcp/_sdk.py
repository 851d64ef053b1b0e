"""Every import from the ``mcp`` Python SDK lives here (pinned ``mcp>=2.3,<3``).

The SDK renamed ``FastMCP`` to ``MCPServer`` in 2.0 and moved transport options around
(api_anchors §6.2, §11.6); keeping the imports in one module means the next major bump touches
this file only. The rest of ``hooocus_mcp`` (and its tests) import from here.

Importing this module starts nothing.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware, get_access_token
from mcp.server.auth.middleware.bearer_auth import (
    AuthenticatedUser,
    BearerAuthBackend,
    RequireAuthMiddleware,
    authorization_context,
)
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.stdio import _claim_fd, _open_stdin_diversion, stdio_server
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER, StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp_types import (
    Annotations,
    CallToolResult,
    ErrorData,
    ImageContent,
    JSONRPCError,
    ResourceLink,
    TextContent,
    ToolAnnotations,
    jsonrpc_message_adapter,
)
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from engine.core.errors import pydantic_error_to_hooocus

__all__ = [
    "AccessToken", "Annotations", "AuthContextMiddleware", "BearerAuthBackend", "CallToolResult", "Client",
    "Context", "HooocusMCPServer", "ImageContent", "MCPError", "MCPServer", "ReadResourceContents",
    "RequireAuthMiddleware", "ResourceLink", "ResourceNotFoundError", "StdioServerParameters",
    "BoundedSessionManager", "bounded_session_manager", "StreamableHTTPASGIApp", "StreamableHTTPSessionManager", "TextContent", "ToolAnnotations", "ToolError",
    "TokenVerifier", "TransportSecurityMiddleware", "TransportSecuritySettings", "get_access_token",
    "sniff_image_mime", "streamable_http_client", "ErrorData", "JSONRPCError", "SessionMessage",
    "claim_stdin", "jsonrpc_message_adapter", "run_server_on_streams", "stdio_server",
]

log = logging.getLogger("hooocus.mcp.sessions")

_IMAGE_URI_RE = re.compile(r"^hooocus://images/[0-9a-f]{64}$")


def sniff_image_mime(data: bytes) -> str | None:
    """The MIME type of PNG/JPEG/WEBP bytes from their magic numbers, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


class HooocusMCPServer(MCPServer):
    """``MCPServer`` whose image resources carry their real MIME type and whose argument errors
    read like every other door's.

    A resource template has one fixed ``mime_type``, but a job may write PNG, JPEG or WEBP, so
    ``hooocus://images/{sha256}`` reads get the type sniffed from the bytes. Tool arguments that
    fail the input schema come back as ``invalid_request: <field path>: <problem>`` (the engine's
    formatting, as the websocket and HTTP doors give it) instead of pydantic's multi-line dump
    with its model name and documentation URL. Everything else is the SDK's own behaviour.
    """

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            # The SDK wraps the argument ValidationError in a ToolError (its __cause__).
            if isinstance(exc.__cause__, ValidationError):
                err = pydantic_error_to_hooocus(exc.__cause__)
                raise ToolError(f"{err.code}: {err.message}") from exc.__cause__
            raise

    async def read_resource(self, uri: Any, context: Any = None) -> Any:
        result = await super().read_resource(uri, context)
        if not _IMAGE_URI_RE.match(str(uri)) or not isinstance(result, Iterable):
            return result
        contents = list(result)
        for item in contents:
            if isinstance(item.content, bytes):
                item.mime_type = sniff_image_mime(item.content) or item.mime_type
        return contents


#: JSON-RPC error code of a refused session (implementation-defined server error range).
TOO_MANY_SESSIONS_RPC_CODE = -32000


class BoundedSessionManager(StreamableHTTPSessionManager):
    """The SDK's stateful session manager with a session cap per principal as well as overall.

    The SDK caps only the total (default 10 000) and answers 503 to everybody once one client has
    filled it, for as long as the idle timeout (issue 11 #2). Here, a request that would open a
    session for a principal already holding ``max_sessions_per_principal`` first ends that
    principal's least recently used *idle* session (no request in flight, no open GET stream):
    a client that re-initializes without closing its old sessions keeps working, and its
    abandoned sessions go. When every one of them is busy, or the server holds ``max_sessions``,
    the answer is 429 with a JSON-RPC error (``data.code`` "too_many_sessions"). Sessions of
    *other* principals are never ended to make room: one user cannot log another out.

    Relies on these SDK internals (pinned ``mcp>=2.3,<3``; tests/mcp/test_sessions.py breaks if
    they change): ``_session_creation_lock``, ``_admit_session``, ``_serve_opening_request``,
    ``_discard_session``, ``_server_instances``, ``_session_owners`` and the transport's
    ``_requests_in_flight``.
    """

    def __init__(self, app: Any, *, max_sessions: int, max_sessions_per_principal: int,
                 session_idle_timeout: float, **kw: Any) -> None:
        super().__init__(app, max_sessions=max_sessions, session_idle_timeout=session_idle_timeout, **kw)
        self.max_sessions_per_principal = max_sessions_per_principal
        #: session id -> anyio time of its last request; bounded like _server_instances (pruned
        #: whenever a session is admitted or discarded).
        self._last_used: dict[str, float] = {}

    @property
    def open_sessions(self) -> int:
        return len(self._server_instances)

    def sessions_of(self, principal: str | None) -> list[str]:
        """Open session ids of ``principal`` (the bearer token's name), oldest use first."""
        ids = [sid for sid in self._server_instances if _principal_name(self._session_owners.get(sid)) == principal]
        return sorted(ids, key=lambda sid: self._last_used.get(sid, 0.0))

    async def _handle_stateful_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        session_id = Headers(scope=scope).get(MCP_SESSION_ID_HEADER)
        if session_id is not None:
            if session_id in self._server_instances:
                self._last_used[session_id] = anyio.current_time()
            await super()._handle_stateful_request(scope, receive, send)
            return
        user = scope.get("user")
        requestor = authorization_context(user) if isinstance(user, AuthenticatedUser) else None
        principal = _principal_name(requestor)
        async with self._session_creation_lock:
            refusal = await self._make_room(principal)
            transport = None if refusal else self._admit_session(requestor)
        if transport is None:
            log.warning("refused a new MCP session for %r: %s", principal, refusal or "server limit")
            await _too_many_sessions(refusal or "the server's session limit is reached")(scope, receive, send)
            return
        assert transport.mcp_session_id is not None
        self._last_used[transport.mcp_session_id] = anyio.current_time()
        await self._serve_opening_request(transport, scope, receive, send)

    async def _make_room(self, principal: str | None) -> str | None:
        """End idle sessions of ``principal`` above its cap; a refusal reason when no room."""
        mine = self.sessions_of(principal)
        while len(mine) >= self.max_sessions_per_principal:
            idle = [sid for sid in mine if _is_idle(self._server_instances.get(sid))]
            if not idle:
                return (f"{len(mine)} sessions of {principal!r} are busy (limit "
                        f"{self.max_sessions_per_principal}); close one (HTTP DELETE) or wait")
            victim = idle[0]
            log.info("ending idle MCP session %s of %r to make room for a new one", victim[:8], principal)
            await self._discard_session(victim, self._server_instances[victim])
            mine.remove(victim)
        if self.max_sessions is not None and len(self._server_instances) >= self.max_sessions:
            return f"the server holds {len(self._server_instances)} sessions (limit {self.max_sessions})"
        return None

    async def _discard_session(self, session_id: str, transport: StreamableHTTPServerTransport) -> None:
        self._last_used.pop(session_id, None)
        await super()._discard_session(session_id, transport)

    async def terminate_all(self) -> int:
        """End every open session now (shutdown): open SSE streams finish instead of holding the
        server's graceful-shutdown wait. Returns how many were ended."""
        sessions = list(self._server_instances.items())
        for session_id, transport in sessions:
            await self._discard_session(session_id, transport)
        return len(sessions)


def claim_stdin() -> tuple[Any, Any]:
    """fd 0 as a binary stream for the MCP wire, with fd 0 itself pointed at the null device while
    we serve (what ``stdio_server()`` does when given no stdin), and the function that restores it
    (None when stdin is not a real descriptor, e.g. under pytest)."""
    return _claim_fd(0, sys.stdin, "rb", _open_stdin_diversion)


async def run_server_on_streams(server: MCPServer, read_stream: Any, write_stream: Any) -> None:
    """What ``MCPServer.run_stdio_async`` does inside its ``stdio_server()`` block."""
    lowlevel = server._lowlevel_server  # noqa: SLF001 - the SDK's own run_stdio_async does the same
    await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())


def bounded_session_manager(server: MCPServer, **kw: Any) -> BoundedSessionManager:
    """A :class:`BoundedSessionManager` over ``server`` (what ``streamable_http_app`` would build)."""
    return BoundedSessionManager(server._lowlevel_server, **kw)  # noqa: SLF001 - see the class docstring


def _principal_name(requestor: Any) -> str | None:
    return None if requestor is None else requestor.get("client_id")


def _is_idle(transport: StreamableHTTPServerTransport | None) -> bool:
    return transport is not None and not getattr(transport, "_requests_in_flight", 0)


def _too_many_sessions(message: str) -> JSONResponse:
    body = {"jsonrpc": "2.0", "id": None,
            "error": {"code": TOO_MANY_SESSIONS_RPC_CODE, "message": f"too_many_sessions: {message}",
                      "data": {"code": "too_many_sessions"}}}
    # Retry-After: sessions free up as they end or go idle; a second is enough to try again.
    return JSONResponse(body, status_code=429, headers={"Retry-After": "1"})
