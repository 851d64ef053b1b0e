"""Streamable HTTP at ``/mcp`` inside the ``hooocus serve`` app (api_anchors §11.3, §11.4; B4).

One process, one engine, one queue: the tools use a :class:`LocalBackend` over the host's runtime.
Order of checks for every request, before any JSON-RPC parsing:

1. Host and Origin against allowlists (DNS-rebinding protection, also when bound to 0.0.0.0):
   bad Host → 421, bad Origin → 403 (the SDK's own validator).
2. ``Authorization: Bearer`` against the shared :class:`TokenStore` → 401 with ``WWW-Authenticate``
   when missing or wrong, 403 without the ``generate`` scope. The token is never forwarded
   anywhere (no passthrough); the principal name owns the jobs.

Responses stream as SSE (``json_response=False``): JSON mode would drop progress notifications.
Mount ``McpMount.app`` at ``/mcp`` (``Route("/mcp", endpoint=mount.app)`` serves the path without a
trailing-slash redirect) and enter ``McpMount.lifespan()`` in the host app's lifespan: a mounted
sub-app's own lifespan never runs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.core.access import TokenStore
from engine.core.runtime import Runtime
from hooocus_mcp._sdk import (
    AccessToken,
    AuthContextMiddleware,
    BearerAuthBackend,
    BoundedSessionManager,
    HooocusMCPServer,
    RequireAuthMiddleware,
    StreamableHTTPASGIApp,
    TransportSecurityMiddleware,
    TransportSecuritySettings,
    bounded_session_manager,
)
from hooocus_mcp.backend import LocalBackend
from hooocus_mcp.tools import ServerOptions, build_server

log = logging.getLogger("hooocus.mcp.http")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
REQUIRED_SCOPES = ["generate"]


class TokenStoreVerifier:
    """The SDK's ``TokenVerifier`` over our hashed static tokens (same tokens as the websocket)."""

    def __init__(self, tokens: TokenStore) -> None:
        self._tokens = tokens

    async def verify_token(self, token: str) -> AccessToken | None:
        principal = self._tokens.verify(token)
        if principal is None:
            return None
        # The raw token is not kept: nothing downstream needs it, and nothing may forward it.
        # The SDK's RequireAuthMiddleware compares scope strings literally, so hand it every scope
        # the principal holds by Principal.can (the one rule for all doors: admin implies all).
        return AccessToken(token="<redacted>", client_id=principal.name, scopes=sorted(principal.effective_scopes()))


def security_settings(allowed_hosts: Sequence[str], allowed_origins: Sequence[str]) -> TransportSecuritySettings:
    """Allowlists in the SDK's format. Loopback names are always allowed (a rebinding attack
    arrives with the attacker's host name); a host given without a port allows any port. A page
    served from an allowed host name may call /mcp too: ``http(s)://<allowed host>`` is an allowed
    Origin (same names as the Host list: a rebinding attacker cannot send one of them)."""
    if "*" in allowed_hosts:
        log.warning("allowed_hosts '*' does not switch off the Host check of /mcp (DNS-rebinding protection); "
                    "list the host names clients use")
    hosts: list[str] = []
    origins = [f"http://{h}:*" for h in LOOPBACK_HOSTS] + [f"http://{h}" for h in LOOPBACK_HOSTS]
    for host in (*LOOPBACK_HOSTS, *(h for h in allowed_hosts if h != "*")):
        host = f"[{host}]" if host.count(":") > 1 and not host.startswith("[") else host  # bare IPv6
        has_port = "]:" in host if host.startswith("[") else ":" in host
        hosts += [host] if has_port else [host, f"{host}:*"]
        origins += [f"{scheme}://{name}" for scheme in ("http", "https") for name in hosts[-2 if not has_port else -1:]]
    origins += [o.rstrip("/") for o in allowed_origins]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=list(dict.fromkeys(hosts)),
                                     allowed_origins=list(dict.fromkeys(origins)))


def public_host(public_url: str | None) -> str | None:
    """The host[:port] of the configured public URL, which clients behind it send as Host."""
    if not public_url:
        return None
    from urllib.parse import urlsplit

    return urlsplit(public_url).netloc.rpartition("@")[2] or None


class _GuardedApp:
    """Host/Origin first, then bearer auth, then the SDK's streamable HTTP handler.

    A class instance (not a function) so Starlette's ``Route`` treats it as a raw ASGI app.
    """

    def __init__(self, inner: ASGIApp, guard: TransportSecurityMiddleware) -> None:
        self._inner = inner
        self._guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await PlainTextResponse("not found", status_code=404)(scope, receive, send)
            return
        rejection = await self._guard.validate_request(Request(scope), is_post=False)
        if rejection is not None:
            await rejection(scope, receive, send)
            return
        await self._inner(scope, receive, send)


@dataclass
class McpMount:
    """The MCP endpoint for the host app: ``app`` to mount, ``lifespan()`` to enter once."""

    app: ASGIApp
    server: HooocusMCPServer
    session_manager: BoundedSessionManager

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        async with self.session_manager.run():
            try:
                yield
            finally:
                await self.close_sessions()

    async def close_sessions(self) -> int:
        """End every MCP session now. The host calls this when it starts to drain, so that open
        SSE streams (a client's GET stream lasts as long as its session) end at once instead of
        holding the server's graceful-shutdown wait; the lifespan exit does it again (a no-op)."""
        return await self.session_manager.terminate_all()


def create_mcp_mount(runtime: Runtime, tokens: TokenStore, *, allowed_hosts: Sequence[str] = (),
                     allowed_origins: Sequence[str] = (), options: ServerOptions | None = None) -> McpMount:
    """Build (not start) the ``/mcp`` endpoint over ``runtime``'s engine and image store.
    Session limits and the idle timeout come from ``runtime.settings`` (``mcp_*``)."""
    server = build_server(LocalBackend(runtime), options)
    limits = runtime.settings
    public = public_host(limits.public_url)
    settings = security_settings([*allowed_hosts, *([public] if public else [])], allowed_origins)
    # Our own session manager (per-principal caps) instead of the one streamable_http_app() would
    # make; we serve its handler through our own guard, so the path does not matter to us.
    manager = bounded_session_manager(server, json_response=False, security_settings=settings,
                                      max_sessions=limits.mcp_max_sessions,
                                      max_sessions_per_principal=limits.mcp_max_sessions_per_principal,
                                      session_idle_timeout=limits.mcp_session_idle_s)
    authed = AuthenticationMiddleware(
        AuthContextMiddleware(RequireAuthMiddleware(StreamableHTTPASGIApp(manager), REQUIRED_SCOPES)),
        backend=BearerAuthBackend(TokenStoreVerifier(tokens)),
    )
    app = _GuardedApp(authed, TransportSecurityMiddleware(settings))
    return McpMount(app=app, server=server, session_manager=manager)
