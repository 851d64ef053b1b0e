"""Issue 16 at the MCP door on the demo model: generate_image takes image_prompts=[{image, type,
stop_at, weight}] with a hooocus://images link from an earlier result; the slots change the image,
FaceSwap is a tool error with the stable code 'unsupported', and nothing is queued for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hooocus_mcp._sdk import Client
from hooocus_mcp.backend import LocalBackend
from hooocus_mcp.tools import ServerOptions, build_server
from tests.mcp.conftest import STDIO

pytestmark = pytest.mark.anyio
ARGS = {"prompt": "a lighthouse", "performance": "Lightning", "width": 64, "height": 64, "seed": 3, "styles": []}


async def test_generate_image_with_image_prompts_on_the_demo_model(tmp_path: Path) -> None:
    from engine.core.runtime import create_runtime
    from engine.core.settings import Settings

    runtime = create_runtime(Settings(data_dir=tmp_path), model="demo").start()
    try:
        server = build_server(LocalBackend(runtime), ServerOptions(default_caller=STDIO, progress_min_interval_s=0))
        async with Client(server) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            slot_schema = tools["generate_image"].input_schema["properties"]["image_prompts"]
            assert slot_schema["anyOf"][0]["maxItems"] == 4
            plain = await client.call_tool("generate_image", ARGS)
            assert plain.structured_content["status"] == "completed", plain.content[0]
            first = plain.structured_content["images"][0]
            slots = [{"image": first["uri"], "type": "ImagePrompt", "stop_at": 1.0, "weight": 1.0},
                     {"image": first["uri"], "type": "PyraCanny"}]
            prompted = await client.call_tool("generate_image", {**ARGS, "image_prompts": slots})
            assert prompted.structured_content["status"] == "completed", prompted.content[0]
            assert prompted.structured_content["images"][0]["sha256"] != first["sha256"]
            jobs = len(runtime.engine.jobs())
            refused = await client.call_tool("generate_image", {**ARGS, "image_prompts": [
                {"image": first["uri"], "type": "FaceSwap"}]})
            assert refused.is_error and "unsupported" in refused.content[0].text
            assert len(runtime.engine.jobs()) == jobs
    finally:
        runtime.close()
