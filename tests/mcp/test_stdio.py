"""The stdio transport: the SDK's client launches the server as a subprocess, as an agent host does."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import sys

import anyio
import pytest
from PIL import Image

from hooocus_mcp._sdk import Client, ImageContent, StdioServerParameters
from tests.paths import REPO_ROOT

pytestmark = pytest.mark.anyio
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONPATH": str(REPO_ROOT)}


def fake_server(step_delay_s: float = 0.0) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "tests.mcp.stdio_fake_server", str(step_delay_s)],
                                 cwd=str(REPO_ROOT), env=ENV)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_stdio_lists_tools_generates_and_serves_the_full_image(mode: str) -> None:
    values: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        values.append(progress)

    async with Client(fake_server(0.02), mode=mode) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        result = await client.call_tool("generate_image", {"prompt": "fox", "performance": "Lightning"},
                                        progress_callback=on_progress)
        ref = result.structured_content["images"][0]
        blob = base64.b64decode((await client.read_resource(ref["uri"])).contents[0].blob)
    assert tools == {"generate_image", "edit_image", "enhance_image", "describe_image", "get_job", "cancel_job",
                     "list_options"}
    assert hashlib.sha256(blob).hexdigest() == ref["sha256"]
    thumb = next(c for c in result.content if isinstance(c, ImageContent))
    assert Image.open(io.BytesIO(base64.b64decode(thumb.data))).format == "WEBP"
    assert values == sorted(set(values)) and values[-1] == 4


async def test_stdio_cancel_notification_cancels_the_job() -> None:
    seen = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.set()

    async with Client(fake_server(0.05), mode="legacy") as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.call_tool("generate_image", {"prompt": "victim", "performance": "Quality"},
                                                   progress_callback=on_progress))
            with anyio.fail_after(20):
                await seen.wait()
            tg.cancel_scope.cancel()
        nxt = await client.call_tool("generate_image", {"prompt": "next", "performance": "Lightning"})
        assert nxt.structured_content["status"] == "completed"
        # not queued behind the rest of the victim's 60 x 50 ms steps: the cancel reached the engine
        assert nxt.structured_content["timings"]["queued_ms"] < 1000


async def test_stdio_demo_model_end_to_end(tmp_path) -> None:
    params = StdioServerParameters(command=sys.executable, cwd=str(REPO_ROOT), env=ENV,
                                   args=["-m", "hooocus_mcp", "--model", "demo", "--data-dir", str(tmp_path)])
    async with Client(params) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse", "performance": "Lightning",
                                                           "width": 256, "height": 256, "seed": 1},
                                        read_timeout_seconds=300)
        assert result.structured_content["status"] == "completed", result.content[0]
        ref = result.structured_content["images"][0]
        blob = base64.b64decode((await client.read_resource(ref["uri"])).contents[0].blob)
    assert hashlib.sha256(blob).hexdigest() == ref["sha256"]
    assert Image.open(io.BytesIO(blob)).size == (256, 256)


@pytest.mark.skipif(importlib.util.find_spec("hooocus_ws.app") is None,
                    reason="hooocus_ws.app (the websocket server) is not written yet")
async def test_stdio_proxy_mode_forwards_to_a_running_server(runtime) -> None:
    from engine.core.access import TokenStore
    from hooocus_ws.app import create_app
    from tests.mcp.conftest import ALICE_TOKEN, TOKENS_TEXT, live_server

    app = create_app(runtime, tokens=TokenStore.parse(TOKENS_TEXT), manage_runtime=False)
    with live_server(app) as live:
        params = StdioServerParameters(
            command=sys.executable, cwd=str(REPO_ROOT), env={**ENV, "HOOOCUS_TOKEN": ALICE_TOKEN},
            args=["-m", "hooocus_mcp", "--connect", live.url.replace("http", "ws") + "/v1/ws"])
        async with Client(params) as client:
            result = await client.call_tool("generate_image", {"prompt": "via ws", "performance": "Lightning"})
            ref = result.structured_content["images"][0]
            blob = base64.b64decode((await client.read_resource(ref["uri"])).contents[0].blob)
    assert result.structured_content["status"] == "completed", result.content[0]
    assert hashlib.sha256(blob).hexdigest() == ref["sha256"]
    [job] = runtime.engine.jobs()  # the one engine of the serving process ran it, for the token's principal
    assert job.owner == "alice" and job.request.prompt == "via ws"
