"""describe_image at the MCP door (issue 16): the tiny describe models through the real loaders, an
image named by a link from an earlier result (owner only) or a data URI, bad input as tool errors
with stable codes, and a cancelled call cancelling the describe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from engine.core.access import Principal
from engine.core.inputs import InputResolver, UploadStore
from engine.core.jobs import Engine
from engine.core.runtime import Runtime
from engine.core.settings import Settings
from engine.core.store import ImageStore
from engine.core.testing import FakeRunner
from engine.describe.service import Describer
from hooocus_mcp._sdk import Client
from hooocus_mcp.backend import LocalBackend
from hooocus_mcp.tools import ServerOptions, build_server
from tests.images import data_uri, solid_png

pytestmark = pytest.mark.anyio
ALICE = Principal("alice", frozenset({"generate", "cancel:own"}))
BOB = Principal("bob", frozenset({"generate", "cancel:own"}))
VIEWER = Principal("viewer", frozenset({"cancel:own"}))
BLUE_TAGS = "hatsune miku, smile, ribbon \\(hair\\), blue theme"


@pytest.fixture
def runtime(describe_models_dir: Path) -> Iterator[Runtime]:
    images = ImageStore()
    resolver = InputResolver(UploadStore(), images=images)
    engine = Engine(FakeRunner(), image_sink=images.put, resolve_inputs=resolver)
    describer = Describer(Settings(data_dir=describe_models_dir.parent, device="cpu"),
                          resolve_image=resolver.resolve_one, device_lock=engine.device_lock)
    rt = Runtime(Settings(), engine, images, describer=describer).start()
    yield rt
    rt.close()


def server_for(runtime: Runtime, caller: Principal):
    return build_server(LocalBackend(runtime), ServerOptions(default_caller=caller, progress_min_interval_s=0))


async def test_describe_image_by_data_uri_and_by_link(runtime: Runtime) -> None:
    async with Client(server_for(runtime, ALICE)) as alice, Client(server_for(runtime, BOB)) as bob:
        tools = {tool.name: tool for tool in (await alice.list_tools()).tools}
        assert "describe_image" in tools and tools["describe_image"].output_schema is not None
        tagged = await alice.call_tool("describe_image", {"image": data_uri(solid_png(20, 20, (0, 0, 255))),
                                                          "mode": "anime"})
        assert not tagged.is_error, tagged.content
        assert tagged.structured_content["prompt"] == BLUE_TAGS == tagged.content[0].text
        assert tagged.structured_content["styles"] == ["Fooocus V2", "Fooocus Masterpiece"]
        made = await alice.call_tool("generate_image", {"prompt": "a", "performance": "Lightning"})
        link = made.structured_content["images"][0]["uri"]
        caption = await alice.call_tool("describe_image", {"image": link})
        assert not caption.is_error and caption.structured_content["mode"] == "photo"
        assert caption.structured_content["styles"] == ["Fooocus V2", "Fooocus Enhance", "Fooocus Sharp"]
        foreign = await bob.call_tool("describe_image", {"image": link})
        assert foreign.is_error and "not_found: no image sha256:" in foreign.content[0].text


async def test_describe_image_bad_input_is_a_tool_error(runtime: Runtime) -> None:
    async with Client(server_for(runtime, ALICE)) as alice, Client(server_for(runtime, VIEWER)) as viewer:
        for arguments, start in (({"image": "data:image/png;base64,AAAA"}, "invalid_image:"),
                                 ({"image": "hooocus://jobs/x"}, "invalid_request: image:"),
                                 ({"image": data_uri(solid_png(8, 8, (1, 1, 1))), "style": "x"},
                                  "invalid_request: unknown argument")):
            result = await alice.call_tool("describe_image", arguments)
            assert result.is_error and start in result.content[0].text, result.content
        bad_mode = await alice.call_tool("describe_image", {"image": data_uri(solid_png(8, 8, (1, 1, 1))),
                                                            "mode": "sketch"})
        assert bad_mode.is_error
        forbidden = await viewer.call_tool("describe_image", {"image": data_uri(solid_png(8, 8, (1, 1, 1)))})
        assert forbidden.is_error and "forbidden:" in forbidden.content[0].text
    assert not runtime.describer._tasks


async def test_cancelling_the_call_cancels_the_describe(runtime: Runtime) -> None:
    seen = []
    real_submit = runtime.describer.submit

    def spy(*args, **kwargs):
        task = real_submit(*args, **kwargs)
        seen.append(task)
        return task

    runtime.describer.submit = spy
    runtime.engine.device_lock.acquire()  # a generation holds the device: the describe waits
    try:
        async with Client(server_for(runtime, ALICE)) as alice:
            async with anyio.create_task_group() as tg:
                tg.start_soon(alice.call_tool, "describe_image", {"image": data_uri(solid_png(8, 8, (1, 1, 1)))})
                with anyio.fail_after(10):
                    while not seen:
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
            with anyio.fail_after(5):
                while not seen[0].cancel_token.is_set():
                    await anyio.sleep(0.01)
    finally:
        runtime.engine.device_lock.release()
    with pytest.raises(Exception) as info:
        await anyio.to_thread.run_sync(lambda: seen[0].future.result(timeout=5))
    assert getattr(info.value, "code", None) == "cancelled"


async def test_describe_image_through_a_proxy_to_a_server(runtime: Runtime) -> None:
    """``hooocus mcp --connect``: the remote backend posts the describe to the server's /v1/describe."""
    from engine.core.access import TokenStore
    from hooocus.cli import connect_ws_client
    from hooocus_mcp.remote import RemoteBackend
    from hooocus_ws.app import create_app
    from tests.mcp.conftest import ALICE_TOKEN, STDIO, TOKENS_TEXT, live_server

    app = create_app(runtime, tokens=TokenStore.parse(TOKENS_TEXT), manage_runtime=False)
    with live_server(app) as live:
        backend = RemoteBackend.for_url(live.url.replace("http", "ws") + "/v1/ws", ALICE_TOKEN,
                                        connect_client=connect_ws_client)
        try:
            async with Client(build_server(backend, ServerOptions(default_caller=STDIO))) as mcp:
                tagged = await mcp.call_tool("describe_image", {"image": data_uri(solid_png(20, 20, (0, 0, 255))),
                                                                "mode": "anime"})
                assert not tagged.is_error, tagged.content
                assert tagged.structured_content["prompt"] == BLUE_TAGS
                missing = await mcp.call_tool("describe_image", {"image": "sha256:" + "0" * 64})
                assert missing.is_error and "not_found:" in missing.content[0].text
        finally:
            await backend.aclose()
