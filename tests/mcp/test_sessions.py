"""MCP session limits on /mcp under a real uvicorn on loopback (issue 11 #2: 10 000 initializes from one
token filled the SDK's table and locked everybody else out for 30 minutes; SIGTERM then took 22 s).

Bounded loops only: 50 initializes against a cap of 8 (the flood's shape, not its size).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from engine.core.access import TokenStore
from engine.core.jobs import Engine
from engine.core.runtime import Runtime
from engine.core.settings import Settings
from engine.core.store import ImageStore
from engine.core.testing import FakeRunner
from hooocus_mcp.http import McpMount, create_mcp_mount
from tests.mcp.conftest import ALICE_TOKEN, BOB_TOKEN, TOKENS_TEXT, LiveServer, live_server

pytestmark = pytest.mark.anyio
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
SSE_JSON = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


@contextlib.contextmanager
def serving(**limits: object) -> Iterator[tuple[LiveServer, McpMount]]:
    images = ImageStore()
    runtime = Runtime(Settings(**limits), Engine(FakeRunner(), image_sink=images.put), images).start()
    mount = create_mcp_mount(runtime, TokenStore.parse(TOKENS_TEXT))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with mount.lifespan():
            yield

    try:
        with live_server(Starlette(routes=[Route("/mcp", endpoint=mount.app)], lifespan=lifespan)) as live:
            yield live, mount
    finally:
        runtime.close()


def auth(token: str) -> dict[str, str]:
    return {**SSE_JSON, "authorization": f"Bearer {token}"}


async def initialize(http: httpx2.AsyncClient, live: LiveServer, token: str) -> httpx2.Response:
    return await http.post(f"{live.url}/mcp", json=INIT, headers=auth(token))


async def ping(http: httpx2.AsyncClient, live: LiveServer, token: str, session_id: str) -> int:
    response = await http.post(f"{live.url}/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "ping"},
                               headers={**auth(token), "mcp-session-id": session_id,
                                        "mcp-protocol-version": "2025-06-18"})
    return response.status_code


@contextlib.asynccontextmanager
async def get_stream(http: httpx2.AsyncClient, live: LiveServer, token: str, session_id: str
                     ) -> AsyncIterator[httpx2.Response]:
    """An open GET SSE stream: the session has a request in flight (busy) while it lasts."""
    headers = {"authorization": f"Bearer {token}", "accept": "text/event-stream", "mcp-session-id": session_id,
               "mcp-protocol-version": "2025-06-18"}
    async with http.stream("GET", f"{live.url}/mcp", headers=headers) as response:
        assert response.status_code == 200
        yield response


async def test_a_flood_of_initializes_keeps_one_principal_within_its_cap() -> None:
    with serving(mcp_max_sessions_per_principal=8, mcp_max_sessions=64) as (live, mount):
        manager = mount.session_manager
        async with httpx2.AsyncClient(timeout=10) as http:
            ids = []
            for _ in range(50):
                response = await initialize(http, live, ALICE_TOKEN)
                assert response.status_code == 200  # the client that re-initializes keeps working
                ids.append(response.headers["mcp-session-id"])
                assert manager.open_sessions <= 8
            other = await initialize(http, live, BOB_TOKEN)
            assert other.status_code == 200  # everybody else still gets in
            assert manager.open_sessions == 9 and len(manager.sessions_of("alice")) == 8
            assert await ping(http, live, ALICE_TOKEN, ids[-1]) == 200  # the newest sessions live on
            assert await ping(http, live, ALICE_TOKEN, ids[0]) == 404  # the oldest idle one was ended


async def test_busy_sessions_are_kept_and_the_new_one_gets_429() -> None:
    with serving(mcp_max_sessions_per_principal=2) as (live, mount):
        async with httpx2.AsyncClient(timeout=10) as http:
            first, second = [(await initialize(http, live, ALICE_TOKEN)).headers["mcp-session-id"] for _ in "ab"]
            async with get_stream(http, live, ALICE_TOKEN, first), get_stream(http, live, ALICE_TOKEN, second):
                refused = await initialize(http, live, ALICE_TOKEN)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                body = refused.json()
                assert body["error"]["data"]["code"] == "too_many_sessions" and body["id"] is None
                assert body["error"]["message"].startswith("too_many_sessions: 2 sessions of 'alice' are busy")
                assert set(mount.session_manager.sessions_of("alice")) == {first, second}
                assert (await initialize(http, live, BOB_TOKEN)).status_code == 200


async def test_the_server_cap_never_ends_another_principals_session() -> None:
    with serving(mcp_max_sessions=3, mcp_max_sessions_per_principal=8) as (live, mount):
        async with httpx2.AsyncClient(timeout=10) as http:
            mine = [(await initialize(http, live, ALICE_TOKEN)).headers["mcp-session-id"] for _ in range(3)]
            refused = await initialize(http, live, BOB_TOKEN)
            assert refused.status_code == 429 and refused.json()["error"]["data"]["code"] == "too_many_sessions"
            assert "limit 3" in refused.json()["error"]["message"]
            assert all([await ping(http, live, ALICE_TOKEN, sid) == 200 for sid in mine])


async def test_idle_sessions_expire_after_the_configured_time() -> None:
    # 0.3 s idle timeout; the session must be gone well within 3 s (10x margin for a loaded CI box).
    with serving(mcp_session_idle_s=0.3) as (live, mount):
        async with httpx2.AsyncClient(timeout=10) as http:
            sid = (await initialize(http, live, ALICE_TOKEN)).headers["mcp-session-id"]
            with anyio.fail_after(3):
                while mount.session_manager.open_sessions:
                    await anyio.sleep(0.05)
            assert await ping(http, live, ALICE_TOKEN, sid) == 404


def test_settings_default_to_bounded_sessions_and_a_short_idle_time() -> None:
    settings = Settings()
    assert settings.mcp_max_sessions_per_principal < settings.mcp_max_sessions <= 10_000
    assert settings.mcp_session_idle_s <= 30 * 60 / 2  # well below the SDK's 30 minutes


def test_shutdown_with_open_streams_is_fast() -> None:
    """The host's drain hook (here uvicorn's shutdown, as HooocusServer does) ends the sessions, so open SSE
    streams close and uvicorn does not wait out its graceful-shutdown time (set to 30 s here)."""
    from hooocus_ws.cli import HooocusServer, uvicorn_config

    images = ImageStore()
    runtime = Runtime(Settings(mcp_max_sessions_per_principal=8), Engine(FakeRunner(), image_sink=images.put),
                      images).start()
    mount = create_mcp_mount(runtime, TokenStore.parse(TOKENS_TEXT))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with mount.lifespan():
            yield

    app = Starlette(routes=[Route("/mcp", endpoint=mount.app)], lifespan=lifespan)
    config = uvicorn_config(app, host="127.0.0.1", port=0, max_message_bytes=65536, log_level="warning",
                            graceful_shutdown_s=30.0)
    server = HooocusServer(config, before_shutdown=mount.close_sessions)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        live = LiveServer(url=f"http://127.0.0.1:{port}", server=server)
        opened = threading.Event()

        async def hold_streams() -> None:
            async with httpx2.AsyncClient(timeout=30) as http, contextlib.AsyncExitStack() as stack:
                for _ in range(8):
                    sid = (await initialize(http, live, ALICE_TOKEN)).headers["mcp-session-id"]
                    await stack.enter_async_context(get_stream(http, live, ALICE_TOKEN, sid))
                opened.set()
                with contextlib.suppress(httpx2.HTTPError):
                    await anyio.sleep(60)

        client = threading.Thread(target=lambda: anyio.run(hold_streams), daemon=True)
        client.start()
        assert opened.wait(15) and mount.session_manager.open_sessions == 8
        started = time.monotonic()
        server.should_exit = True
        thread.join(30)
        took_s = time.monotonic() - started
    finally:
        server.should_exit = True
        thread.join(30)
        runtime.close()
    # Before: uvicorn waited for the 8 open streams until its graceful-shutdown timeout (30 s here).
    assert not thread.is_alive() and took_s < 5.0, took_s
