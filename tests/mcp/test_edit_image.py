"""The MCP ``edit_image`` tool (issue 14): each mode becomes contract14's request fields, bad
arguments are tool errors with the field path and queue nothing, and it shares generate_image's
progress, client-cancel and thumbnail handling (FakeRunner engine, SDK client in memory)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.core.access import Principal
from engine.core.runtime import Runtime
from engine.core.testing import StepGate
from hooocus_mcp._sdk import Client, ImageContent, ResourceLink
from hooocus_mcp.backend import LocalBackend
from hooocus_mcp.edit_image import UOV_METHOD_BY_MODE, edit_fields
from hooocus_mcp.tools import ServerOptions, build_server
from tests.images import InputsRecorder, data_uri, solid_png
from tests.mcp.conftest import cancel_tool_call_mid_job, make_inputs_runtime

pytestmark = pytest.mark.anyio
ALICE = Principal("alice", frozenset({"generate", "cancel:own"}))


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    rt = make_inputs_runtime(InputsRecorder()).start()
    yield rt
    rt.close()


def server_for(runtime: Runtime):
    return build_server(LocalBackend(runtime), ServerOptions(default_caller=ALICE, progress_min_interval_s=0))


def png_uri(width: int = 32, height: int = 24, *, white: bool = False) -> str:
    return data_uri(solid_png(width, height, (255, 255, 255) if white else (9, 99, 199)))


@pytest.mark.parametrize("mode, extra, expected", [
    ("vary_subtle", {}, {"uov_method": "Vary (Subtle)", "outpaint_selections": []}),
    ("vary_strong", {}, {"uov_method": "Vary (Strong)", "outpaint_selections": []}),
    ("upscale_1.5x", {}, {"uov_method": "Upscale (1.5x)", "outpaint_selections": []}),
    ("upscale_2x", {}, {"uov_method": "Upscale (2x)", "outpaint_selections": []}),
    ("upscale_fast_2x", {}, {"uov_method": "Upscale (Fast 2x)", "outpaint_selections": []}),
    ("inpaint", {"mask": "MASK"}, {"uov_method": "Disabled", "outpaint_selections": []}),
    ("outpaint", {"outpaint": ["top", "left", "top"]}, {"uov_method": "Disabled",
                                                         "outpaint_selections": ["Left", "Top"]}),
])
async def test_each_mode_becomes_the_contract_request_fields(runtime: Runtime, mode: str, extra: dict,
                                                             expected: dict) -> None:
    args = {"image": png_uri(), "mode": mode, "performance": "Lightning",
            **{k: (png_uri(white=True) if v == "MASK" else v) for k, v in extra.items()}}
    async with Client(server_for(runtime)) as client:
        result = await client.call_tool("edit_image", args)
    assert not result.is_error, result.content
    job = runtime.engine.get_job(result.structured_content["job_id"])
    assert {k: getattr(job.request, k) for k in expected} == expected
    assert job.request.prompt == ""  # the prompt is optional
    seen = runtime.engine.runner.seen[job.job_id]
    assert seen["input_image"].shape == (24, 32, 3)
    assert ("inpaint_mask" in seen) == (mode == "inpaint")


def test_every_mode_has_a_mapping_and_no_other() -> None:
    modes = set(UOV_METHOD_BY_MODE) | {"inpaint", "outpaint"}
    assert modes == {"vary_subtle", "vary_strong", "upscale_1.5x", "upscale_2x", "upscale_fast_2x", "inpaint",
                     "outpaint"}
    assert edit_fields("inpaint", image="sha256:" + "a" * 64, mask="hooocus://images/" + "B" * 64,
                       outpaint=["right"]) == {"input_image": "sha256:" + "a" * 64,
                                               "inpaint_mask": "sha256:" + "b" * 64,
                                               "outpaint_selections": ["Right"]}


async def test_schema_lists_the_modes_and_sides_as_enums(runtime: Runtime) -> None:
    async with Client(server_for(runtime)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    edit = tools["edit_image"]
    props = edit.input_schema["properties"]
    assert sorted(edit.input_schema["required"]) == ["image", "mode"]
    assert set(props["mode"]["enum"]) == set(UOV_METHOD_BY_MODE) | {"inpaint", "outpaint"}
    assert set(props["outpaint"]["anyOf"][0]["items"]["enum"]) == {"left", "right", "top", "bottom"}
    assert edit.output_schema == tools["generate_image"].output_schema


@pytest.mark.parametrize("args, needle", [
    ({"mode": "blur"}, "invalid_request: mode:"),
    ({"mode": "inpaint"}, "invalid_request: mask: mode 'inpaint' needs a mask"),
    ({"mode": "outpaint"}, "invalid_request: outpaint: mode 'outpaint' needs the sides"),
    ({"mode": "outpaint", "outpaint": ["middle"]}, "invalid_request: outpaint.0:"),
    ({"mode": "vary_subtle", "mask": "MASK"}, "invalid_request: mask: not used by mode 'vary_subtle'"),
    ({"mode": "upscale_2x", "outpaint": ["left"]}, "invalid_request: outpaint: not used by mode 'upscale_2x'"),
    ({"mode": "vary_strong", "steps": 3}, "unknown argument(s) ['steps']"),
    ({"mode": "vary_strong", "image": "hooocus://jobs/x"}, "invalid_request: image: not an image link"),
    ({"mode": "vary_strong", "image": "data:image/png;base64,AAAA"}, "invalid_image:"),
])
async def test_bad_arguments_are_tool_errors_with_the_field_and_queue_nothing(runtime: Runtime, args: dict,
                                                                              needle: str) -> None:
    full = {"image": png_uri(), **{k: (png_uri(white=True) if v == "MASK" else v) for k, v in args.items()}}
    async with Client(server_for(runtime)) as client:
        result = await client.call_tool("edit_image", full)
        assert result.is_error and needle in result.content[0].text, result.content[0].text
        assert runtime.engine.jobs() == []  # nothing queued
        ok = await client.call_tool("edit_image", {"image": png_uri(), "mode": "vary_subtle",
                                                   "performance": "Lightning"})
        assert ok.structured_content["status"] == "completed"


async def test_progress_thumbnails_and_links_like_generate_image(runtime: Runtime) -> None:
    values: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        values.append(progress)

    async with Client(server_for(runtime)) as client:
        made = await client.call_tool("generate_image", {"prompt": "a", "performance": "Lightning"})
        link = made.structured_content["images"][0]["uri"]
        result = await client.call_tool("edit_image", {"image": link, "mode": "upscale_fast_2x", "image_number": 2,
                                                       "performance": "Lightning"}, progress_callback=on_progress)
    assert values == sorted(set(values)) and values[-1] == 8  # 2 images x 4 Lightning steps
    assert sum(isinstance(c, ImageContent) for c in result.content) == 2
    assert sum(isinstance(c, ResourceLink) for c in result.content) == 2
    assert result.content[0].text.startswith("Generated 2 images")


async def test_client_cancel_of_a_vary_job_stops_it_and_the_next_job_runs() -> None:
    gate = StepGate(2)
    runner = InputsRecorder(on_step=gate)
    runtime = make_inputs_runtime(runner).start()
    try:
        async with Client(server_for(runtime)) as client:
            await cancel_tool_call_mid_job(client, runtime, gate, "edit_image",
                                           {"image": png_uri(), "mode": "vary_strong"})
            nxt = await client.call_tool("edit_image", {"image": png_uri(), "mode": "vary_subtle",
                                                        "performance": "Lightning"})
            assert nxt.structured_content["status"] == "completed"
    finally:
        runtime.close()
