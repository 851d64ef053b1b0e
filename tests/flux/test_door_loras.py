"""LoRAs through the doors on both families (issue 17): MCP ``generate_image`` takes ``loras`` (validated
like the HTTP/websocket request: ``unknown_lora`` / ``invalid_request`` with the field path, nothing
queued) on demo and demo-flux in one server, and the websocket runs a Flux LoRA; each gives the bytes
the engine gives for the same request field."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from engine.core.jobs import JobState
from engine.core.runtime import Runtime, create_runtime
from engine.core.settings import Settings
from engine.sdxl.models.demo import build_demo_sdxl
from hooocus_ws.protocol import FRAME_IMAGE
from tests.flux.test_flux_lora_jobs import KOHYA, SDXL, write_loras
from tests.lora_models import write_qkv_lora
from tests.ws.conftest import WsReader, connect, make_app

SDXL_DEMO_LORA = "sdxl_demo_lora.safetensors"
BASE = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "seed": 11, "styles": []}
WAIT_S = 300


def write_sdxl_demo_lora(path: Path) -> None:
    """A kohya-named LoRA on the demo SDXL UNet's attention q/k/v (what a real SDXL LoRA touches)."""
    write_qkv_lora(build_demo_sdxl().unet, path, seed=7, scale=0.5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data")
    folder = Settings(data_dir=data).models_dir / "loras"
    write_loras(folder)
    write_sdxl_demo_lora(folder / SDXL_DEMO_LORA)
    return data


@pytest.fixture(scope="module")
def runtime(data_dir: Path) -> Iterator[Runtime]:
    rt = create_runtime(Settings(data_dir=data_dir, device="cpu"), model="demo", record_history=False).start()
    yield rt
    rt.close()


def engine_bytes(runtime: Runtime, **params: Any) -> bytes:
    job = runtime.engine.submit({**BASE, **params})
    assert job.wait(WAIT_S) and job.state is JobState.DONE, job.events_after(0)[-1]
    return job.images[0].data


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_mcp_generate_image_loras_on_both_families(runtime: Runtime) -> None:
    from hooocus_mcp._sdk import Client
    from hooocus_mcp.backend import LocalBackend
    from hooocus_mcp.tools import ServerOptions, build_server
    from tests.mcp.conftest import STDIO

    server = build_server(LocalBackend(runtime), ServerOptions(default_caller=STDIO, progress_min_interval_s=0))
    args = {key: BASE[key] for key in ("prompt", "width", "height", "seed", "styles")}
    got: dict[tuple[str, str], bytes] = {}
    async with Client(server) as mcp:
        for model, lora in (("demo", SDXL_DEMO_LORA), ("demo-flux", KOHYA)):
            for label, loras in (("plain", None), ("lora", [{"name": lora, "weight": 0.8}])):
                call = {**args, "model": model, **({"loras": loras} if loras else {})}
                done = await mcp.call_tool("generate_image", call)
                assert done.structured_content["status"] == "completed", done.content[0]
                uri = done.structured_content["images"][0]["uri"]
                got[model, label] = base64.b64decode((await mcp.read_resource(uri)).contents[0].blob)
        jobs_before = len(runtime.engine.jobs())
        unknown = await mcp.call_tool("generate_image", {**args, "model": "demo-flux",
                                                         "loras": [{"name": "no_such_lora", "weight": 1.0}]})
        # an SDXL LoRA does not fit a FLUX.1 model: refused at submit as on HTTP/websocket
        misfit = await mcp.call_tool("generate_image", {**args, "model": "demo-flux",
                                                        "loras": [{"name": SDXL, "weight": 1.0}]})
        bad_weight = await mcp.call_tool("generate_image", {**args, "loras": [{"name": KOHYA, "weight": 99}]})
        extra = await mcp.call_tool("generate_image", {**args, "loras": [{"name": KOHYA, "strength": 1}]})
        assert len(runtime.engine.jobs()) == jobs_before  # nothing queued for any of them
    for model, lora in (("demo", SDXL_DEMO_LORA), ("demo-flux", KOHYA)):
        assert got[model, "lora"] != got[model, "plain"], model
        assert got[model, "lora"] == engine_bytes(runtime, base_model=model, loras=[{"name": lora, "weight": 0.8}])
        assert got[model, "plain"] == engine_bytes(runtime, base_model=model)
    for refused in (unknown, misfit):
        assert refused.is_error and "unknown_lora" in refused.content[0].text
        assert "loras.0.name" in refused.content[0].text
    for refused, path in ((bad_weight, "loras.0.weight"), (extra, "loras.0.strength")):
        assert refused.is_error and refused.content[0].text.startswith("invalid_request")
        assert path in refused.content[0].text, refused.content[0].text


def test_websocket_flux_lora_job_gives_the_engines_bytes(runtime: Runtime, data_dir: Path) -> None:
    params = {**BASE, "base_model": "demo-flux", "loras": [{"name": KOHYA, "weight": 0.8}]}
    reference = engine_bytes(runtime, **params)
    # the app's lifespan closes its runtime: a server of its own (an SDXL one, running a Flux LoRA job)
    served = create_runtime(Settings(data_dir=data_dir, device="cpu", shutdown_grace_s=1.0), model="demo")
    with TestClient(make_app(served)) as client, connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        for request in (params, {**params, "loras": []}, {**params, "loras": [{"name": SDXL, "weight": 1.0}]}):
            reader.send({"type": "generate", "id": "g", "params": request})
            last = reader.until_type("done", "error", "cancelled")[-1]
        assert last["type"] == "error" and last["code"] == "unknown_lora"
        assert last["loc"] == ["params", "loras", 0, "name"]
    images = [payload for kind, _, payload in reader.frames if kind == FRAME_IMAGE]
    assert images == [reference, images[1]] and images[1] != reference
