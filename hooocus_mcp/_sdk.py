"""Every import from the ``mcp`` Python SDK lives here (pinned ``mcp>=2.3,<3``).

The SDK renamed ``FastMCP`` to ``MCPServer`` in 2.0 and moved transport options around
(api_anchors §6.2, §11.6); keeping the imports in one module means the next major bump touches
this file only. The rest of ``hooocus_mcp`` (and its tests) import from here.

Importing this module starts nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware, get_access_token
from mcp.server.auth.middleware.bearer_auth import BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import (
    Annotations,
    CallToolResult,
    ImageContent,
    ResourceLink,
    TextContent,
    ToolAnnotations,
)
from pydantic import ValidationError

from engine.errors import pydantic_error_to_hooocus

__all__ = [
    "AccessToken", "Annotations", "AuthContextMiddleware", "BearerAuthBackend", "CallToolResult", "Client",
    "Context", "HooocusMCPServer", "ImageContent", "MCPError", "MCPServer", "ReadResourceContents",
    "RequireAuthMiddleware", "ResourceLink", "ResourceNotFoundError", "StdioServerParameters",
    "StreamableHTTPASGIApp", "StreamableHTTPSessionManager", "TextContent", "ToolAnnotations", "ToolError",
    "TokenVerifier", "TransportSecurityMiddleware", "TransportSecuritySettings", "get_access_token",
    "sniff_image_mime", "streamable_http_client",
]

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
