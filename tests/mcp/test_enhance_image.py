"""The MCP ``enhance_image`` tool (issue 16): its arguments become the request's ``enhance`` fields on
the input image (enhance-only), bad arguments are tool errors naming the field and queue nothing, a
cancelled call cancels the job, and on the demo model with tiny mask models it runs the passes end
to end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.core.access import Principal
from engine.core.runtime import Runtime
from engine.core.settings import Settings
from engine.core.testing import StepGate
from hooocus_mcp._sdk import Client
from hooocus_mcp.backend import LocalBackend
from hooocus_mcp.tools import ServerOptions, build_server
from tests.images import InputsRecorder, data_uri, solid_png
from tests.mcp.conftest import cancel_tool_call_mid_job, make_inputs_runtime

pytestmark = pytest.mark.anyio
ALICE = Principal("alice", frozenset({"generate", "cancel:own"}))
NOTHING = {"detection_prompt": "face", "box_threshold": 1.0}


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    rt = make_inputs_runtime(InputsRecorder()).start()
    yield rt
    rt.close()


def server_for(runtime: Runtime):
    return build_server(LocalBackend(runtime), ServerOptions(default_caller=ALICE, progress_min_interval_s=0))


def png_uri(width: int = 32, height: int = 24) -> str:
    return data_uri(solid_png(width, height, (9, 99, 199)))


async def test_arguments_become_the_enhance_request_fields(runtime: Runtime) -> None:
    args = {"image": png_uri(), "tabs": [{"detection_prompt": "hand", "prompt": "detailed hand", "max_detections": 2},
                                         {"mask_model": "u2net_cloth_seg", "cloth_category": "upper"}],
            "uov_method": "Upscale (2x)", "uov_processing_order": "After Last Enhancement",
            "save_only_final": True, "performance": "Lightning"}
    async with Client(server_for(runtime)) as client:
        result = await client.call_tool("enhance_image", args)
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert not result.is_error, result.content
    job = runtime.engine.get_job(result.structured_content["job_id"])
    enhance = job.request.enhance
    assert job.request.enhance_only and enhance is not None
    assert enhance.uov_method == "Upscale (2x)" and enhance.uov_processing_order == "After Last Enhancement"
    assert enhance.save_only_final and [t.mask_model for t in enhance.tabs] == ["sam", "u2net_cloth_seg"]
    assert enhance.tabs[0].prompt == "detailed hand" and enhance.tabs[0].max_detections == 2
    assert enhance.tabs[1].cloth_category == "upper"
    assert runtime.engine.runner.seen[job.job_id]["input_image"].shape == (24, 32, 3)
    schema = tools["enhance_image"].input_schema
    assert schema["required"] == ["image"] and "tabs" in schema["properties"]
    assert tools["enhance_image"].output_schema == tools["generate_image"].output_schema


@pytest.mark.parametrize("args, needle", [
    ({"tabs": [{}]}, "invalid_request: enhance.tabs.0.detection_prompt"),
    ({"tabs": []}, "invalid_request: enhance.tabs: enhance has nothing to do"),
    ({"tabs": [{"mask_model": "u2net", "strength": 2}]}, "tabs.0.strength"),
    ({"tabs": [{"mask_model": "u2net", "colour": "red"}]}, "tabs.0.colour"),
    ({"tabs": [NOTHING], "steps": 3}, "unknown argument(s) ['steps']"),
    ({"tabs": [NOTHING], "image": "hooocus://jobs/x"}, "invalid_request: image: not an image link"),
])
async def test_bad_arguments_are_tool_errors_and_queue_nothing(runtime: Runtime, args: dict, needle: str) -> None:
    async with Client(server_for(runtime)) as client:
        result = await client.call_tool("enhance_image", {"image": png_uri(), **args})
        assert result.is_error and needle in result.content[0].text, result.content[0].text
        assert runtime.engine.jobs() == []


async def test_client_cancel_stops_the_job_and_the_next_one_runs() -> None:
    gate = StepGate(2)
    runtime = make_inputs_runtime(InputsRecorder(on_step=gate)).start()
    try:
        async with Client(server_for(runtime)) as client:
            await cancel_tool_call_mid_job(client, runtime, gate, "enhance_image",
                                           {"image": png_uri(), "tabs": [NOTHING]})
            nxt = await client.call_tool("enhance_image", {"image": png_uri(), "tabs": [NOTHING],
                                                           "performance": "Lightning"})
            assert nxt.structured_content["status"] == "completed"
    finally:
        runtime.close()


async def test_enhance_image_on_the_demo_model(tmp_path: Path) -> None:
    from engine.core.runtime import create_runtime
    from tests.enhance_models import install_tiny_enhance_models

    settings = Settings(data_dir=tmp_path, shutdown_grace_s=1.0)
    install_tiny_enhance_models(settings.models_dir, rembg_models=())
    runtime = create_runtime(settings, model="demo").start()
    try:
        async with Client(server_for(runtime)) as client:
            result = await client.call_tool("enhance_image", {
                "image": png_uri(48, 40), "tabs": [NOTHING], "uov_method": "Upscale (Fast 2x)", "seed": 3,
                "wait_timeout_s": 120})
            missing = await client.call_tool("enhance_image", {"image": png_uri(), "tabs": [{"mask_model": "silueta"}]})
    finally:
        runtime.close()
    assert not result.is_error, result.content
    images = result.structured_content["images"]
    assert result.structured_content["status"] == "completed" and len(images) == 1 and images[0]["width"] > 48
    assert missing.is_error and "model_missing" in missing.content[0].text
    assert "hooocus setup --only enhance" in missing.content[0].text
