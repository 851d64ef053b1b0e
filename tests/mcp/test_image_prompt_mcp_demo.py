"""Issue 16 at the MCP door on the demo model: generate_image takes image_prompts=[{image, type,
stop_at, weight}] with a hooocus://images link from an earlier result; the slots change the image;
FaceSwap uses the face the demo detector finds (the same face at two places of a data-URI picture gives
one image), a running FaceSwap job cancels with cancel_job, and a bad slot is a tool error with its
stable code and nothing is queued for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hooocus_mcp._sdk import Client
from hooocus_mcp.backend import LocalBackend
from hooocus_mcp.tools import ServerOptions, build_server
from tests.face_models import face_picture
from tests.mcp.conftest import STDIO

pytestmark = pytest.mark.anyio


def _data_uri(image) -> str:  # noqa: ANN001 - an H×W×3 uint8 array
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
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
            here, there = (_data_uri(face_picture(128, 128, cell=cell)) for cell in ((1, 1), (2, 2)))
            swapped = [await client.call_tool("generate_image", {**ARGS, "image_prompts": [
                {"image": uri, "type": "FaceSwap"}]}) for uri in (here, there)]
            assert all(r.structured_content["status"] == "completed" for r in swapped), swapped[0].content[0]
            face_here, face_there = (r.structured_content["images"][0]["sha256"] for r in swapped)
            assert face_here == face_there != first["sha256"]
            jobs = len(runtime.engine.jobs())
            refused = await client.call_tool("generate_image", {**ARGS, "image_prompts": [
                {"image": first["uri"], "type": "FaceSwap", "stop_at": 2}]})
            assert refused.is_error and "invalid_request" in refused.content[0].text
            assert len(runtime.engine.jobs()) == jobs
            # Cancel: a 60-step FaceSwap job returns 'running' at once, cancel_job stops it.
            running = await client.call_tool("generate_image", {**ARGS, "performance": "Quality",
                                                                "wait_timeout_s": 0, "image_prompts": [
                {"image": here, "type": "FaceSwap"}]})
            job_id = running.structured_content["job_id"]
            assert running.structured_content["status"] in ("queued", "running"), running.content[0]
            cancelled = await client.call_tool("cancel_job", {"job_id": job_id})
            assert cancelled.structured_content["status"] == "cancelled", cancelled.content[0]
            again = await client.call_tool("generate_image", {**ARGS, "image_prompts": [
                {"image": here, "type": "FaceSwap"}]})
            assert again.structured_content["images"][0]["sha256"] == face_here
    finally:
        runtime.close()
