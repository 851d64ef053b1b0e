"""The MCP tools and resources through the SDK's real client, in memory, over the FakeRunner engine
(reliability matrix rows 29, 30, 33)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time

import anyio
import pytest
from PIL import Image

from engine.core.access import Principal
from engine.core.runtime import Runtime
from engine.core.testing import FakeRunner, StepGate
from hooocus_mcp._sdk import Client, ImageContent, MCPError, ResourceLink, TextContent
from hooocus_mcp.backend import LocalBackend
from hooocus_mcp.tools import JobResult, ServerOptions, build_server
from tests.mcp.conftest import STDIO, cancel_tool_call_mid_job

pytestmark = pytest.mark.anyio


def server_for(runtime: Runtime, *, caller: Principal = STDIO, **kw: object):
    return build_server(LocalBackend(runtime), ServerOptions(default_caller=caller, progress_min_interval_s=0, **kw))


def no_base64_inside(value: object) -> bool:
    """True when no string in a JSON value is long enough to be an inlined image."""
    if isinstance(value, str):
        return len(value) < 200
    if isinstance(value, dict):
        return all(no_base64_inside(v) for v in value.values())
    if isinstance(value, list):
        return all(no_base64_inside(v) for v in value)
    return True


async def test_lists_tools_with_input_and_output_schemas(runtime: Runtime) -> None:
    async with Client(server_for(runtime)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
    assert set(tools) == {"generate_image", "edit_image", "enhance_image", "describe_image", "get_job", "cancel_job",
                          "list_options"}
    gen = tools["generate_image"]
    props = gen.input_schema["properties"]
    assert gen.input_schema["required"] == ["prompt"]
    assert {"prompt", "negative_prompt", "styles", "performance", "aspect_ratio", "width", "height", "seed",
            "image_number", "sampler", "scheduler", "cfg", "sharpness", "model", "output_format", "max_side_px",
            "wait_timeout_s", "image", "mask", "image_prompts", "loras"} == set(props)
    width = props["width"]["anyOf"][0]
    assert (width["multipleOf"], width["minimum"], width["maximum"]) == (8, 64, 2048)
    assert "Speed" in props["performance"]["anyOf"][0]["enum"]
    assert set(gen.output_schema["required"]) >= {"job_id", "status", "images", "seeds", "params_resolved"}
    assert gen.annotations is not None and gen.annotations.read_only_hint is False
    assert gen.annotations.destructive_hint is False
    assert tools["cancel_job"].annotations.idempotent_hint is True
    assert tools["get_job"].output_schema == gen.output_schema
    assert {"hooocus://images/{sha256}", "hooocus://jobs/{job_id}"} <= templates


async def test_generate_returns_text_thumbnails_links_and_structured_content(runtime: Runtime) -> None:
    async with Client(server_for(runtime)) as client:
        result = await client.call_tool("generate_image", {"prompt": "a red fox", "performance": "Lightning",
                                                           "image_number": 2, "seed": "9007199254740993"})
        assert not result.is_error
        text, *rest = result.content
        assert isinstance(text, TextContent) and text.text.startswith("Generated 2 images (seeds 9007199254740993, ")
        thumbs = [c for c in rest if isinstance(c, ImageContent)]
        links = [c for c in rest if isinstance(c, ResourceLink)]
        assert len(thumbs) == 2 and len(links) == 2
        structured = JobResult.model_validate(result.structured_content)
        assert structured.status == "completed" and structured.seeds == ["9007199254740993", "9007199254740994"]
        assert no_base64_inside(result.structured_content)
        for thumb, link, ref in zip(thumbs, links, structured.images, strict=True):
            small = Image.open(io.BytesIO(base64.b64decode(thumb.data)))
            assert small.format == "WEBP" and thumb.mime_type == "image/webp" and max(small.size) <= 512
            assert str(link.uri) == ref.uri == f"hooocus://images/{ref.sha256}"
            full = (await client.read_resource(str(link.uri))).contents[0]
            data = base64.b64decode(full.blob)
            assert hashlib.sha256(data).hexdigest() == ref.sha256 and len(data) == ref.size_bytes == link.size
            assert full.mime_type == link.mime_type == "image/png"
            assert Image.open(io.BytesIO(data)).size == (ref.width, ref.height)
        job = json.loads((await client.read_resource(f"hooocus://jobs/{structured.job_id}")).contents[0].text)
        assert job["status"] == "completed" and job["images"] == result.structured_content["images"]


async def test_jpeg_output_resource_carries_its_own_mime_type(runtime: Runtime) -> None:
    async with Client(server_for(runtime)) as client:
        result = await client.call_tool("generate_image", {"prompt": "x", "performance": "Lightning",
                                                           "output_format": "jpeg"})
        ref = result.structured_content["images"][0]
        full = (await client.read_resource(ref["uri"])).contents[0]
    assert ref["mime_type"] == full.mime_type == "image/jpeg"


async def test_thumbnails_respect_the_inline_budget(runtime: Runtime, runner: FakeRunner) -> None:
    runner.image_max_side_px = 256
    async with Client(server_for(runtime, inline_budget_b64_chars=400)) as client:
        result = await client.call_tool("generate_image", {"prompt": "x", "performance": "Lightning",
                                                           "image_number": 3, "max_side_px": 128})
    inline = sum(len(c.data) for c in result.content if isinstance(c, ImageContent))
    assert 0 < inline <= 400
    assert len([c for c in result.content if isinstance(c, ResourceLink)]) == 3  # links are never dropped


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_progress_strictly_increases_and_ends_at_total(runtime: Runtime, mode: str) -> None:
    values: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        values.append((progress, total))

    async with Client(server_for(runtime), mode=mode) as client:
        await client.call_tool("generate_image", {"prompt": "x", "performance": "Lightning", "image_number": 3},
                               progress_callback=on_progress)
    done = [p for p, _ in values]
    assert done == sorted(set(done)) and len(done) == 12  # 3 images x 4 steps, one report per step
    assert values[-1] == (12, 12) and all(total == 12 for _, total in values)


@pytest.mark.parametrize("args, expected", [
    ({"prompt": "x", "width": 13, "height": 64}, "invalid_request: width: Input should be a multiple of 8"),
    ({}, "invalid_request: prompt: Field required"),
    ({"prompt": "x", "image_number": "lots"}, "invalid_request: image_number: Input should be a valid integer"),
    ({"prompt": "x", "styles": ["a", 7]}, "invalid_request: styles.1: Input should be a valid string"),
])
async def test_schema_errors_read_like_the_other_doors(runtime: Runtime, args: dict, expected: str) -> None:
    # Before: "Error executing tool generate_image: 1 validation error for generate_imageArguments ...
    # For further information visit https://errors.pydantic.dev/...".
    async with Client(server_for(runtime)) as client:
        result = await client.call_tool("generate_image", args)
    text = result.content[0].text
    assert result.is_error and text.startswith(expected)
    assert "\n" not in text and "pydantic" not in text and "Arguments" not in text
    assert runtime.engine.jobs() == []


async def test_server_info_carries_the_package_version(runtime: Runtime) -> None:
    import importlib.metadata

    async with Client(server_for(runtime), mode="legacy") as client:
        info = client.server_info
    assert info is not None and info.name == "hooocus"
    assert info.version == importlib.metadata.version("hooocus") and info.version != ""


@pytest.mark.parametrize("args, needle", [
    ({"prompt": "x", "width": 1001, "height": 1000}, "multiple of 8"),
    ({"prompt": "x", "width": 1024}, "give both width and height"),
    ({"prompt": "x", "styles": ["Fooocus Sharpp"]}, "Did you mean ['Fooocus Sharp'"),
    ({"prompt": "x", "model": "nope"}, "unknown_model"),
    ({"prompt": "x", "steps_count": 3}, "unknown argument(s) ['steps_count']"),
    ({"prompt": "x", "aspect_ratio": "wide"}, "aspect_ratio must look like '1152*896'"),
    ({"prompt": ""}, "at least 1 character"),
])
async def test_invalid_arguments_are_tool_errors_the_model_can_act_on(runtime: Runtime, args: dict,
                                                                      needle: str) -> None:
    async with Client(server_for(runtime)) as client:
        result = await client.call_tool("generate_image", args)
    assert result.is_error and needle in result.content[0].text
    assert runtime.engine.jobs() == []  # nothing was queued


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_client_cancel_stops_the_job_within_a_step_and_frees_the_engine(mode: str) -> None:
    from tests.mcp.conftest import make_runtime

    gate = StepGate(3)
    runner = FakeRunner(on_step=gate)
    runtime = make_runtime(runner).start()
    try:
        async with Client(server_for(runtime), mode=mode) as client:
            victim = await cancel_tool_call_mid_job(client, runtime, gate, "generate_image",
                                                    {"prompt": "victim", "performance": "Speed"})
            assert max(step for job_id, step in runner.step_log if job_id == victim.job_id) <= 3
            nxt = await client.call_tool("generate_image", {"prompt": "next", "performance": "Lightning"})
            assert nxt.structured_content["status"] == "completed"
    finally:
        runtime.close()


async def test_wait_timeout_returns_running_and_the_job_goes_on() -> None:
    from tests.mcp.conftest import make_runtime

    gate = StepGate(2)
    runtime = make_runtime(FakeRunner(on_step=gate)).start()
    try:
        async with Client(server_for(runtime)) as client:
            started = time.monotonic()
            first = await client.call_tool("generate_image", {"prompt": "slow", "performance": "Lightning",
                                                              "wait_timeout_s": 0.3})
            assert time.monotonic() - started < 5
            job_id = first.structured_content["job_id"]
            assert first.structured_content["status"] == "running" and not first.is_error
            assert f"get_job(job_id={job_id!r})" in first.content[0].text
            job = runtime.engine.get_job(job_id)
            assert not job.cancel_token.is_set()  # the fallback never cancels
            gate.release()
            final = await client.call_tool("get_job", {"job_id": job_id, "wait_s": 10})
            assert final.structured_content["status"] == "completed"
            assert any(isinstance(c, ImageContent) for c in final.content)
    finally:
        runtime.close()


async def test_get_job_preview_and_cancel_job_tool() -> None:
    from tests.mcp.conftest import make_runtime

    gate = StepGate(3)
    runtime = make_runtime(FakeRunner(on_step=gate)).start()
    try:
        async with Client(server_for(runtime)) as client:
            first = await client.call_tool("generate_image", {"prompt": "p", "performance": "Lightning",
                                                              "wait_timeout_s": 0})
            job_id = first.structured_content["job_id"]
            assert await anyio.to_thread.run_sync(gate.reached.wait, 10)
            view = await client.call_tool("get_job", {"job_id": job_id, "include_preview": True})
            assert view.structured_content["progress"] == {"done_steps": 2, "total_steps": 4}
            preview = [c for c in view.content if isinstance(c, ImageContent)]
            assert len(preview) == 1 and preview[0].mime_type == "image/jpeg"
            outcome = {}

            async def cancel() -> None:
                outcome["result"] = await client.call_tool("cancel_job", {"job_id": job_id})

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel)
                await anyio.sleep(0.2)
                gate.release()  # the running job notices the cancel at its next step
            cancelled = outcome["result"].structured_content
            assert cancelled == {"job_id": job_id, "cancelled": True, "status": "cancelled", "images": []}
            again = await client.call_tool("cancel_job", {"job_id": job_id})
            assert again.structured_content == {"job_id": job_id, "cancelled": False, "status": "cancelled",
                                                "images": []}
            missing = await client.call_tool("get_job", {"job_id": "j_nope"})
            assert missing.is_error and "not_found" in missing.content[0].text
    finally:
        runtime.close()


async def test_jobs_are_private_to_their_principal(runtime: Runtime) -> None:
    alice = Principal("alice", frozenset({"generate", "cancel:own"}))
    bob = Principal("bob", frozenset({"generate", "cancel:own"}))
    async with Client(server_for(runtime, caller=alice)) as as_alice, \
            Client(server_for(runtime, caller=bob)) as as_bob:
        made = await as_alice.call_tool("generate_image", {"prompt": "mine", "performance": "Lightning"})
        job_id = made.structured_content["job_id"]
        for tool in ("get_job", "cancel_job"):
            result = await as_bob.call_tool(tool, {"job_id": job_id})
            assert result.is_error and "not_found" in result.content[0].text
        with pytest.raises(MCPError):
            await as_bob.read_resource(f"hooocus://jobs/{job_id}")
    assert runtime.engine.get_job(job_id).owner == "alice"


async def test_a_principal_without_generate_scope_is_refused(runtime: Runtime) -> None:
    reader = Principal("reader", frozenset({"cancel:own"}))
    async with Client(server_for(runtime, caller=reader)) as client:
        result = await client.call_tool("generate_image", {"prompt": "x"})
    assert result.is_error and "forbidden" in result.content[0].text and runtime.engine.jobs() == []


async def test_list_options_and_options_resource(runtime: Runtime, runner: FakeRunner) -> None:
    async with Client(server_for(runtime)) as client:
        result = await client.call_tool("list_options", {})
        resource = json.loads((await client.read_resource("hooocus://options")).contents[0].text)
        with pytest.raises(MCPError):
            await client.read_resource("hooocus://images/" + "0" * 64)
    assert result.structured_content == resource == runner.options()


async def test_a_failed_job_is_a_tool_error_with_its_code(runtime: Runtime, runner: FakeRunner) -> None:
    from engine.core.testing import FakeOutOfMemoryError

    runner.faults[("boom", 2)] = FakeOutOfMemoryError("CUDA out of memory")
    async with Client(server_for(runtime)) as client:
        result = await client.call_tool("generate_image", {"prompt": "boom", "performance": "Lightning"})
        after = await client.call_tool("generate_image", {"prompt": "fine", "performance": "Lightning"})
    assert result.is_error and result.content[0].text.endswith("failed (out_of_memory): out of memory; try a "
                                                               "smaller size or fewer images")
    assert result.structured_content["status"] == "failed"
    assert result.structured_content["error"]["code"] == "out_of_memory"
    assert after.structured_content["status"] == "completed"


async def test_queue_full_is_reported_not_raised() -> None:
    from engine.core.jobs import Engine
    from engine.core.settings import Settings
    from engine.core.store import ImageStore

    gate = StepGate(1)
    images = ImageStore()
    runtime = Runtime(Settings(), Engine(FakeRunner(on_step=gate), max_queue=1, image_sink=images.put),
                      images).start()
    try:
        async with Client(server_for(runtime)) as client:
            for prompt in ("running", "queued"):
                first = await client.call_tool("generate_image", {"prompt": prompt, "wait_timeout_s": 0})
                assert first.structured_content["status"] == "running"
            full = await client.call_tool("generate_image", {"prompt": "one too many"})
        assert full.is_error and "queue_full: the queue is full" in full.content[0].text
    finally:
        gate.release()
        runtime.close()


async def test_demo_model_in_memory(tmp_path) -> None:
    from engine.core.runtime import create_runtime
    from engine.core.settings import Settings

    runtime = create_runtime(Settings(data_dir=tmp_path), model="demo").start()
    values: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        values.append(progress)

    try:
        async with Client(server_for(runtime)) as client:
            result = await client.call_tool("generate_image", {"prompt": "a lighthouse", "performance": "Lightning",
                                                               "width": 256, "height": 256, "seed": 3},
                                            progress_callback=on_progress)
            assert result.structured_content["status"] == "completed", result.content[0]
            ref = result.structured_content["images"][0]
            data = base64.b64decode((await client.read_resource(ref["uri"])).contents[0].blob)
            thumb = next(c for c in result.content if isinstance(c, ImageContent))
    finally:
        runtime.close()
    assert hashlib.sha256(data).hexdigest() == ref["sha256"] and Image.open(io.BytesIO(data)).size == (256, 256)
    assert Image.open(io.BytesIO(base64.b64decode(thumb.data))).size == (256, 256)
    assert values == sorted(set(values)) and values[-1] == result.structured_content["progress"]["total_steps"]
