"""Issue 14 at the MCP door: generate_image takes image/mask references; a hooocus://images/<sha256>
link from an earlier result works for its owner only; bad input is a tool error with the stable
code, nothing queued, and the next call works."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.core.access import Principal
from engine.core.errors import InvalidRequest
from engine.core.inputs import InputResolver, UploadStore
from engine.core.jobs import Engine
from engine.core.runtime import Runtime
from engine.core.settings import Settings
from engine.core.store import ImageStore
from hooocus_mcp._sdk import Client
from hooocus_mcp.backend import LocalBackend
from hooocus_mcp.edit_image import image_ref_from_mcp
from hooocus_mcp.tools import ServerOptions, build_server
from tests.images import InputsRecorder, data_uri, solid_png

pytestmark = pytest.mark.anyio
ALICE = Principal("alice", frozenset({"generate", "cancel:own"}))
BOB = Principal("bob", frozenset({"generate", "cancel:own"}))


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    images = ImageStore()
    uploads = UploadStore()
    engine = Engine(InputsRecorder(), image_sink=images.put, resolve_inputs=InputResolver(uploads, images=images))
    rt = Runtime(Settings(), engine, images, uploads=uploads).start()
    yield rt
    rt.close()


def server_for(runtime: Runtime, caller: Principal):
    return build_server(LocalBackend(runtime), ServerOptions(default_caller=caller, progress_min_interval_s=0))


def png_uri(width: int = 24, height: int = 16) -> str:
    return data_uri(solid_png(width, height, (9, 99, 199)))


def test_image_ref_from_mcp_maps_links() -> None:
    sha = "AB" * 32
    assert image_ref_from_mcp(f"hooocus://images/{sha}", field="image") == f"sha256:{sha.lower()}"
    assert image_ref_from_mcp(f"hooocus://images/{sha}.png", field="image") == f"sha256:{sha.lower()}"
    assert image_ref_from_mcp("data:image/png;base64,AA==", field="mask") == "data:image/png;base64,AA=="
    assert image_ref_from_mcp(None, field="image") is None
    with pytest.raises(InvalidRequest) as info:
        image_ref_from_mcp("hooocus://jobs/x", field="mask")
    assert info.value.loc == ("mask",)


async def test_generate_image_with_image_links_owned_per_principal(runtime: Runtime) -> None:
    runner = runtime.engine.runner
    async with Client(server_for(runtime, ALICE)) as alice, Client(server_for(runtime, BOB)) as bob:
        made = await alice.call_tool("generate_image", {"prompt": "a", "performance": "Lightning"})
        first = made.structured_content["images"][0]
        again = await alice.call_tool("generate_image", {"prompt": "b", "performance": "Lightning",
                                                         "image": first["uri"], "mask": png_uri(
                                                             first["width"], first["height"])})
        assert not again.is_error, again.content
        seen = runner.seen[again.structured_content["job_id"]]
        assert seen["input_image"].shape == (first["height"], first["width"], 3)
        assert seen["inpaint_mask"].shape == (first["height"], first["width"])
        jobs_before = len(runtime.engine.jobs())
        foreign = await bob.call_tool("generate_image", {"prompt": "c", "image": first["uri"], "mask": png_uri()})
        assert foreign.is_error and "not_found: no image sha256:" in foreign.content[0].text
        broken = await bob.call_tool("generate_image", {"prompt": "c", "image": "data:image/png;base64,AAAA", "mask": png_uri()})
        assert broken.is_error and "invalid_image:" in broken.content[0].text
        assert len(runtime.engine.jobs()) == jobs_before  # nothing queued
        ok = await bob.call_tool("generate_image", {"prompt": "d", "performance": "Lightning", "image": png_uri(), "mask": png_uri()})
        assert not ok.is_error and ok.structured_content["status"] == "completed"
