"""Streamable HTTP at /mcp under a real uvicorn on loopback: bearer auth, Host/Origin allowlists,
and the SDK's own HTTP client end to end (reliability matrix rows 31, 32, 30, 33)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from engine.core.access import TokenStore
from engine.core.runtime import Runtime
from engine.core.testing import FakeRunner, StepGate
from hooocus_mcp._sdk import Client, streamable_http_client
from hooocus_mcp.http import McpMount, TokenStoreVerifier, create_mcp_mount
from tests.mcp.conftest import (
    ALICE_TOKEN,
    BOB_TOKEN,
    TOKENS_TEXT,
    LiveServer,
    cancel_tool_call_mid_job,
    live_server,
    make_runtime,
)

pytestmark = pytest.mark.anyio
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
ADMIN_TOKEN = "root-token-0123456789abcdefgh"
#: An admin token that lists no other scope: admin implies every scope (Principal.can).
SERVE_TOKENS = TOKENS_TEXT + f"root {ADMIN_TOKEN} admin\n"
SSE_JSON = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def host_app(mount: McpMount) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with mount.lifespan():
            yield

    return Starlette(routes=[Route("/mcp", endpoint=mount.app)], lifespan=lifespan)


@contextlib.contextmanager
def serving(runtime: Runtime, *, bind: str = "127.0.0.1") -> Iterator[LiveServer]:
    mount = create_mcp_mount(runtime, TokenStore.parse(SERVE_TOKENS), allowed_hosts=["gpu.example.com"],
                             allowed_origins=["https://app.example.com"])
    with live_server(host_app(mount), host=bind) as live:
        if bind == "0.0.0.0":  # noqa: S104 - the point of the test; connect over loopback
            live.url = live.url.replace("0.0.0.0", "127.0.0.1")
        yield live


def mcp_client(live: LiveServer, token: str, *, path: str = "/mcp", **kw: object) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return Client(streamable_http_client(f"{live.url}{path}", http_client=http), **kw)


@pytest.fixture
def live(runtime: Runtime) -> Iterator[LiveServer]:
    with serving(runtime, bind="0.0.0.0") as server:  # noqa: S104 - allowlists must hold on 0.0.0.0 too
        yield server


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer " + "x" * len(ALICE_TOKEN)},
                                     {"authorization": "Bearer short"}, {"authorization": f"Basic {ALICE_TOKEN}"}])
async def test_missing_or_wrong_token_is_401_with_www_authenticate(live: LiveServer, headers: dict) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.post(f"{live.url}/mcp", json=INIT, headers={**SSE_JSON, **headers})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert ALICE_TOKEN not in response.text


@pytest.mark.parametrize("headers, status", [
    ({"host": "evil.example"}, 421),
    ({"host": "evil.example:8188"}, 421),
    ({"origin": "http://evil.example"}, 403),
    ({"origin": "https://app.example.com.evil.example"}, 403),
])
@pytest.mark.parametrize("token", [ALICE_TOKEN, None])
async def test_foreign_host_or_origin_is_rejected_before_auth(live: LiveServer, headers: dict, status: int,
                                                              token: str | None) -> None:
    auth = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient() as http:
        response = await http.post(f"{live.url}/mcp", json=INIT, headers={**SSE_JSON, **auth, **headers})
    assert response.status_code == status


@pytest.mark.parametrize("headers", [{"host": "gpu.example.com:8188"}, {"origin": "https://app.example.com"},
                                     {"origin": "http://localhost:5173"}, {}])
async def test_allowed_host_and_origin_pass(live: LiveServer, headers: dict) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.post(f"{live.url}/mcp", json=INIT,
                                   headers={**SSE_JSON, "authorization": f"Bearer {ALICE_TOKEN}", **headers})
    assert response.status_code == 200 and "mcp-session-id" in response.headers


async def test_admin_only_token_may_use_mcp_and_see_every_job(live: LiveServer, runtime: Runtime) -> None:
    # Before: 403 insufficient_scope "Required scope: generate" for a token whose scopes are just "admin".
    async with mcp_client(live, ALICE_TOKEN) as alice, mcp_client(live, ADMIN_TOKEN) as root:
        made = await alice.call_tool("generate_image", {"prompt": "mine", "performance": "Lightning"})
        own = await root.call_tool("generate_image", {"prompt": "admin's", "performance": "Lightning"})
        peek = await root.call_tool("get_job", {"job_id": made.structured_content["job_id"]})
    assert own.structured_content["status"] == "completed"
    assert runtime.engine.get_job(own.structured_content["job_id"]).owner == "root"
    assert not peek.is_error and peek.structured_content["status"] == "completed"


async def test_verifier_grants_admin_every_scope_and_others_only_theirs() -> None:
    verifier = TokenStoreVerifier(TokenStore.parse(SERVE_TOKENS))
    root, alice = await verifier.verify_token(ADMIN_TOKEN), await verifier.verify_token(ALICE_TOKEN)
    assert root is not None and set(root.scopes) == {"admin", "generate", "cancel:own", "cancel:any"}
    assert alice is not None and set(alice.scopes) == {"generate", "cancel:own"}


async def test_verifier_keeps_no_raw_token() -> None:
    verifier = TokenStoreVerifier(TokenStore.parse(TOKENS_TEXT))
    token = await verifier.verify_token(ALICE_TOKEN)
    assert token is not None and token.client_id == "alice" and ALICE_TOKEN not in token.model_dump_json()
    assert await verifier.verify_token(ALICE_TOKEN + "x") is None


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_sdk_client_generates_with_progress_and_reads_the_full_image(live: LiveServer, mode: str) -> None:
    values: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        values.append(progress)

    async with mcp_client(live, ALICE_TOKEN, mode=mode) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        result = await client.call_tool("generate_image", {"prompt": "fox", "performance": "Lightning",
                                                           "image_number": 2}, progress_callback=on_progress)
        assert names == {"generate_image", "edit_image", "enhance_image", "describe_image", "get_job", "cancel_job",
                         "list_options"}
        assert result.structured_content["status"] == "completed"
        for ref in result.structured_content["images"]:
            blob = (await client.read_resource(ref["uri"])).contents[0].blob
            assert hashlib.sha256(base64.b64decode(blob)).hexdigest() == ref["sha256"]
    assert values and values == sorted(set(values)) and values[-1] == 8


async def test_jobs_belong_to_the_bearer_principal(live: LiveServer, runtime: Runtime) -> None:
    async with mcp_client(live, ALICE_TOKEN) as alice, mcp_client(live, BOB_TOKEN) as bob:
        made = await alice.call_tool("generate_image", {"prompt": "mine", "performance": "Lightning"})
        job_id = made.structured_content["job_id"]
        peek = await bob.call_tool("get_job", {"job_id": job_id})
        mine = await alice.call_tool("get_job", {"job_id": job_id})
    assert runtime.engine.get_job(job_id).owner == "alice"
    assert peek.is_error and "not_found" in peek.content[0].text
    assert mine.structured_content["status"] == "completed"


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_cancelling_the_http_call_cancels_the_engine_job(mode: str) -> None:
    gate = StepGate(2)
    runtime = make_runtime(FakeRunner(on_step=gate)).start()
    try:
        with serving(runtime) as live:
            async with mcp_client(live, ALICE_TOKEN, mode=mode) as client:
                await cancel_tool_call_mid_job(client, runtime, gate, "generate_image",
                                               {"prompt": "victim", "performance": "Speed"})
                after = await client.call_tool("generate_image", {"prompt": "next", "performance": "Lightning"})
                assert after.structured_content["status"] == "completed"
    finally:
        runtime.close()


@pytest.mark.parametrize("headers", [
    {"host": "gpu.example.com", "origin": "https://gpu.example.com"},
    {"host": "gpu.example.com:8188", "origin": "http://gpu.example.com:8188"},
])
async def test_a_page_on_an_allowed_host_may_call_mcp(live: LiveServer, headers: dict) -> None:
    # Before: 403 "Invalid Origin header" for a remote client on the allowed name itself.
    async with httpx2.AsyncClient() as http:
        response = await http.post(f"{live.url}/mcp", json=INIT,
                                   headers={**SSE_JSON, "authorization": f"Bearer {ALICE_TOKEN}", **headers})
    assert response.status_code == 200 and "mcp-session-id" in response.headers


async def test_the_public_url_host_is_allowed_and_others_are_not(runner: FakeRunner) -> None:
    from engine.core.jobs import Engine
    from engine.core.settings import Settings
    from engine.core.store import ImageStore

    images = ImageStore()
    runtime = Runtime(Settings(public_url="https://hooocus.example.org/"), Engine(runner, image_sink=images.put),
                      images).start()
    try:
        mount = create_mcp_mount(runtime, TokenStore.parse(TOKENS_TEXT))
        with live_server(host_app(mount)) as live:
            async with httpx2.AsyncClient() as http:
                async def post(host: str) -> int:
                    return (await http.post(f"{live.url}/mcp", json=INIT, headers={
                        **SSE_JSON, "authorization": f"Bearer {ALICE_TOKEN}", "host": host})).status_code

                assert await post("hooocus.example.org") == 200
                assert await post("evil.example") == 421
    finally:
        runtime.close()
