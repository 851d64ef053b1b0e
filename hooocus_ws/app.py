"""``create_app``: the Starlette app of one Hooocus process (websocket, HTTP companions, page, MCP mount).

A factory, no globals: everything the routes need lives in one :class:`ServerContext` on
``app.state.hooocus``. The lifespan starts the runtime's worker and (if given) enters the MCP
mount's lifespan — a mounted app's own lifespan never runs (house style A9.1).

Graceful shutdown (SIGTERM) has two halves. :func:`drain` runs first, while the sockets are still
open (``hooocus_ws.cli.HooocusServer`` calls it before uvicorn's own shutdown): no new jobs,
queued jobs end ``cancelled`` with reason ``shutting_down``, the running job gets
``shutdown_grace_s`` to finish, and every connection's outbox is flushed so clients hear how their
jobs ended. Then uvicorn closes the websockets with 1012 and the lifespan closes the runtime and
the job history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from engine.core.access import TokenStore
from engine.core.errors import HooocusError, ShuttingDown
from engine.core.history import JobHistory
from engine.core.runtime import Runtime
from hooocus_ws import describe, http, parameters
from hooocus_ws.auth import AuthFailure, AuthGate, FailedAuthLimiter, bearer_token, parse_networks
from hooocus_ws.context import ServerContext, ServerLimits
from hooocus_ws.protocol import PROTOCOL, PreviewSettings
from hooocus_ws.session import Session
from hooocus_ws.signing import UrlSigner

log = logging.getLogger("hooocus.ws")

STATIC_DIR = Path(__file__).parent / "static"
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
                               "style-src 'self' 'unsafe-inline'; script-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class McpMount(Protocol):
    """What ``hooocus_mcp.http.create_mcp_mount`` returns."""

    app: Any

    def lifespan(self) -> contextlib.AbstractAsyncContextManager[Any]: ...

    async def close_sessions(self) -> int: ...


class _AsgiApp:
    """Hide what kind of callable an ASGI app is, so Route never mistakes it for a request handler."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def host_name(host_header: str) -> str:
    """The name part of a Host header: ``[::1]:8188`` -> ``[::1]``, ``a.example:80`` -> ``a.example``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


def host_allowed(host_header: str | None, allowed_hosts: Sequence[str]) -> bool:
    """``allowed_hosts`` entries are names (any port) or ``*.domain`` patterns."""
    if not host_header:
        return False
    name = host_name(host_header)
    for pattern in allowed_hosts:
        pattern = host_name(pattern)
        if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class _AllowedHosts:
    """DNS-rebinding defence for every route (HTTP, the websocket and /mcp alike): a request whose
    Host is not in the allowlist gets 403 before anything else runs. The Origin check compares
    against the request's own Host, so it is only as good as this one."""

    def __init__(self, app: Any, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = Headers(scope=scope).get("host")
            if not host_allowed(host, self.allowed_hosts):
                log.info("refused a request for host %r (not in allowed_hosts)", (host or "")[:100])
                await http.error_response(AuthFailure("forbidden", "host not allowed; the server's allowed_hosts "
                                                                   "setting lists the names it answers to"))(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


class _McpAuthLimit:
    """Put /mcp behind the same failed-auth limiter as the websocket and HTTP routes. The MCP
    mount checks tokens itself; here a valid bearer always passes, a missing/invalid one from an
    address over its failure budget gets 429 before reaching the mount, and each 401 the mount
    answers counts as a failure of the caller's address."""

    def __init__(self, app: Any, gate: AuthGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        token = bearer_token(headers)
        if self.gate.tokens.verify(token) is not None:
            await self.app(scope, receive, send)
            return
        peer = scope.get("client")
        address = self.gate.address_of(peer[0] if peer else None, headers)
        try:
            self.gate.refuse_if_blocked(address)
        except AuthFailure as exc:
            await http.error_response(exc)(scope, receive, send)
            return
        reason = "missing_token" if token is None else "bad_token"

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                self.gate.record_failure(address, reason)
            await send(message)

        await self.app(scope, receive, counting_send)


async def _deny(websocket: WebSocket, exc: HooocusError) -> None:
    try:
        await websocket.send_denial_response(http.error_response(exc))
    except RuntimeError:  # a server without the denial-response extension: 403 via close-before-accept
        await websocket.close(code=1008)


async def websocket_endpoint(websocket: WebSocket) -> None:
    """``/v1/ws``: authenticate at the handshake (before accept), then serve a :class:`Session`."""
    ctx: ServerContext = websocket.app.state.hooocus
    offered = websocket.scope.get("subprotocols", [])
    client = ctx.gate.address_of(websocket.client.host if websocket.client else None, websocket.headers)
    try:
        if ctx.closing:
            raise ShuttingDown("the server is shutting down")
        principal = ctx.gate.authenticate(headers=websocket.headers, address=client, scheme=websocket.url.scheme,
                                          query_string=websocket.scope.get("query_string", b""),
                                          subprotocols=offered)
    except (AuthFailure, ShuttingDown) as exc:
        log.info("websocket handshake refused from %s: %s", client, exc.code)
        await _deny(websocket, exc)
        return
    if ctx.ws_per_principal[principal.name] >= ctx.limits.max_ws_per_principal:
        log.info("websocket handshake refused from %s: %s has %d open connections", client, principal.name,
                 ctx.ws_per_principal[principal.name])
        await _deny(websocket, AuthFailure("rate_limited", f"too many open websocket connections for this token "
                                                           f"(limit {ctx.limits.max_ws_per_principal}); close one "
                                                           "first", retry_after_s=1.0))
        return
    ctx.ws_per_principal[principal.name] += 1  # counted before the first await: no race between handshakes
    try:
        # Echo only the protocol name, never the token subprotocol.
        await websocket.accept(subprotocol=PROTOCOL if PROTOCOL in offered else None)
        await Session(websocket, ctx, principal).run()
    finally:
        ctx.ws_per_principal[principal.name] -= 1
        if ctx.ws_per_principal[principal.name] <= 0:
            del ctx.ws_per_principal[principal.name]


async def index_page(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)


async def drain(ctx: ServerContext, *, flush_timeout_s: float | None = None) -> None:
    """The first half of a graceful shutdown (see the module docstring). Idempotent."""
    ctx.closing = True
    if ctx.manage_runtime:
        grace_s = ctx.shutdown_grace_s
        await anyio.to_thread.run_sync(lambda: ctx.runtime.close(grace_s=grace_s))
    for hook in list(ctx.on_drain):
        await hook()
    # The jobs' last events were handed to the loop before close() returned; give every
    # connection a bounded moment to write them before the sockets close.
    deadline = time.monotonic() + (ctx.limits.close_timeout_s if flush_timeout_s is None else flush_timeout_s)
    await asyncio.sleep(0)
    while any(session.has_pending_output for session in list(ctx.sessions)) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def create_app(runtime: Runtime, *, tokens: TokenStore, allowed_origins: Iterable[str] = (),
               allowed_hosts: Sequence[str] | None = None, mcp_mount: McpMount | None = None,
               limits: ServerLimits | None = None, signer: UrlSigner | None = None,
               default_preview: PreviewSettings | None = None, auth_limiter: FailedAuthLimiter | None = None,
               public_url: str | None = None, shutdown_grace_s: float | None = None,
               manage_runtime: bool = True, history: JobHistory | None = None,
               extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """Build the app. ``allowed_hosts`` None or containing "*" disables the Host check;
    ``manage_runtime`` False leaves starting/closing the runtime (and ``history``) to the caller
    (benchmarks, tests). ``history`` is attached to the engine here, so it records every job."""
    settings = runtime.settings
    if limits is None:
        limits = ServerLimits(max_message_bytes=settings.max_message_bytes,
                              event_retention_s=settings.event_retention_s,
                              max_ws_per_principal=settings.max_ws_per_principal)
    public_url = public_url if public_url is not None else settings.public_url
    origins = tuple(allowed_origins)
    if public_url:  # behind a TLS proxy the page's origin is https://public while we see ws://
        public = urlsplit(public_url)
        origins += (f"{public.scheme}://{public.netloc}",)
    gate = AuthGate(tokens=tokens, limiter=auth_limiter or FailedAuthLimiter(),
                    allowed_origins=origins,
                    trusted_proxies=parse_networks(settings.trusted_proxies))
    grace_s = settings.shutdown_grace_s if shutdown_grace_s is None else shutdown_grace_s
    ctx = ServerContext(runtime=runtime, gate=gate, limits=limits,
                        signer=signer or UrlSigner(settings.url_signing_key),
                        default_preview=default_preview or PreviewSettings(),
                        public_url=public_url,
                        history=history, manage_runtime=manage_runtime, shutdown_grace_s=grace_s)
    gate.on_failure = lambda reason: ctx.metrics.auth_failures.update([reason])
    if history is not None:
        history.attach(runtime.engine)
    if mcp_mount is not None:
        ctx.on_drain.append(mcp_mount.close_sessions)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_runtime:
            runtime.start()
        ctx.closing = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                if mcp_mount is not None:
                    await stack.enter_async_context(mcp_mount.lifespan())
                yield
        finally:
            ctx.closing = True
            if manage_runtime:
                # Queued jobs end as cancelled(shutting_down); the running one gets grace_s, then is cancelled.
                # (A no-op when drain() already did it.) The history closes last: it records those events.
                await anyio.to_thread.run_sync(lambda: runtime.close(grace_s=grace_s))
                if history is not None:
                    history.close()

    routes: list[BaseRoute] = [
        WebSocketRoute("/v1/ws", websocket_endpoint),
        Route("/v1/generate", http.generate, methods=["POST"]),
        Route("/v1/uploads", http.upload, methods=["POST"]),
        Route("/v1/describe", describe.describe, methods=["POST"]),
        Route("/v1/jobs", http.list_jobs, methods=["GET"]),
        Route("/v1/jobs/{job_id}", http.get_job, methods=["GET"]),
        Route("/v1/jobs/{job_id}", http.delete_job, methods=["DELETE"]),
        Route("/v1/images/{name}", http.get_image, methods=["GET"]),
        Route("/v1/options", http.options, methods=["GET"]),
        Route("/v1/parameters", parameters.parameters, methods=["POST"]),
        Route("/v1/protocol.json", http.protocol_json, methods=["GET"]),
        Route("/openapi.json", http.openapi, methods=["GET"]),
        Route("/healthz", http.healthz, methods=["GET"]),
        Route("/metrics", http.metrics, methods=["GET"]),
        Route("/", index_page, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
        *extra_routes,
    ]
    if mcp_mount is not None:
        # Both /mcp (what MCP clients are usually given) and /mcp/...; the mount ignores the path.
        mcp_app = _AsgiApp(_McpAuthLimit(mcp_mount.app, gate))
        routes += [Route("/mcp", endpoint=mcp_app), Mount("/mcp", app=mcp_app)]
    middleware = []
    if allowed_hosts is not None and "*" not in allowed_hosts:
        middleware.append(Middleware(_AllowedHosts, allowed_hosts=list(allowed_hosts)))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.hooocus = ctx
    return app
