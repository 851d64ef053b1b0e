"""demo-flux end to end through every door (issue 17): the websocket, HTTP, MCP and the CLI, with a
cancel mid-job and the next job unaffected, and the SDXL-only refusal as each door reports it."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from engine.core.runtime import Runtime, create_runtime
from engine.core.settings import Settings
from engine.core.testing import StepGate
from hooocus_ws.protocol import FRAME_IMAGE
from tests.ws.conftest import ALICE, WsReader, auth, connect, make_app

PARAMS = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "seed": 11}
WAIT_S = 120


def _runtime(tmp_path: Path) -> Runtime:
    return create_runtime(Settings(data_dir=tmp_path, device="cpu", shutdown_grace_s=1.0), model="demo-flux")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, Runtime]]:
    runtime = _runtime(tmp_path)
    with TestClient(make_app(runtime)) as test_client:
        yield test_client, runtime


# -- websocket + HTTP -------------------------------------------------------------------------------


def test_websocket_generate_cancel_mid_job_and_next_job(client: tuple[TestClient, Runtime]) -> None:
    test_client, runtime = client
    gate = StepGate(2)
    with connect(test_client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "generate", "params": PARAMS})
        first = reader.until_type("done", "error", "cancelled")
        assert first[-1]["type"] == "done", first[-1]
        assert next(m for m in first if m["type"] == "started")["params"]["family"] == "flux"
        runtime.engine.runner.on_step = gate
        reader.send({"type": "generate", "params": {**PARAMS, "steps": 6}})
        job_id = reader.recv()["job_id"]
        assert gate.reached.wait(WAIT_S)
        reader.send({"type": "cancel", "id": "c", "job_id": job_id})
        reader.until(lambda m: m.get("type") == "ack" or m.get("id") == "c")
        gate.release()
        cancelled = reader.until_type("cancelled", "done", "error")
        assert cancelled[-1]["type"] == "cancelled" and cancelled[-1]["images_done"] == 0
        runtime.engine.runner.on_step = None
        reader.send({"type": "generate", "params": PARAMS})
        assert reader.until_type("done", "error", "cancelled")[-1]["type"] == "done"
    finals = [payload for kind, _, payload in reader.frames if kind == FRAME_IMAGE]
    assert len(finals) == 2 and finals[0] == finals[1]  # the cancel left nothing behind


def test_websocket_refuses_sdxl_only_fields_naming_the_field(client: tuple[TestClient, Runtime]) -> None:
    test_client, _ = client
    with connect(test_client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "generate", "id": "g", "params": {**PARAMS, "sharpness": 5}})
        error = reader.until_type("error")[-1]
    assert error["code"] == "unsupported_for_model" and error["loc"] == ["params", "sharpness"]


def test_http_generate_options_and_refusal(client: tuple[TestClient, Runtime]) -> None:
    test_client, _ = client
    response = test_client.post("/v1/generate", headers=auth(ALICE), json=PARAMS)
    assert response.status_code == 200 and response.json()["state"] == "done"
    assert response.json()["params"]["family"] == "flux"
    options = test_client.get("/v1/options", headers=auth(ALICE)).json()
    # the default model first; the server runs both families (engine/core/families.py)
    assert options["models"][0] == "demo-flux" and options["family"] == "flux"
    assert options["model_families"] == {"demo-flux": "flux", "demo": "sdxl", "demo-flux-dev": "flux"}
    refused = test_client.post("/v1/generate", headers=auth(ALICE), json={**PARAMS, "adm_scaler_end": 0.5})
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "unsupported_for_model"
    assert refused.json()["error"]["loc"] == ["adm_scaler_end"]


def test_http_cancel_mid_job_then_next_job(client: tuple[TestClient, Runtime]) -> None:
    test_client, runtime = client
    gate = StepGate(2)
    runtime.engine.runner.on_step = gate
    job_id = test_client.post("/v1/generate", headers=auth(ALICE), json={**PARAMS, "steps": 6, "wait": False}
                              ).json()["job_id"]
    assert gate.reached.wait(WAIT_S)
    assert test_client.delete(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()["cancelled"] is True
    gate.release()
    assert runtime.engine.get_job(job_id).wait(WAIT_S)
    runtime.engine.runner.on_step = None
    assert test_client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()["state"] == "cancelled"
    after = test_client.post("/v1/generate", headers=auth(ALICE), json=PARAMS)
    assert after.status_code == 200 and after.json()["state"] == "done"


# -- MCP ----------------------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_mcp_generate_list_options_cancel_and_refusal(tmp_path: Path) -> None:
    from hooocus_mcp._sdk import Client
    from hooocus_mcp.backend import LocalBackend
    from hooocus_mcp.tools import ServerOptions, build_server
    from tests.mcp.conftest import STDIO, cancel_tool_call_mid_job

    runtime = _runtime(tmp_path).start()
    server = build_server(LocalBackend(runtime), ServerOptions(default_caller=STDIO, progress_min_interval_s=0))
    args = {"prompt": PARAMS["prompt"], "width": 64, "height": 64, "seed": 11, "model": "demo-flux"}
    try:
        async with Client(server) as mcp:
            options = (await mcp.call_tool("list_options", {})).structured_content
            assert options["models"][0] == "demo-flux"
            assert options["model_families"] == {"demo-flux": "flux", "demo": "sdxl", "demo-flux-dev": "flux"}
            gate = StepGate(2)
            runtime.engine.runner.on_step = gate
            await cancel_tool_call_mid_job(mcp, runtime, gate, "generate_image", args)
            runtime.engine.runner.on_step = None
            done = await mcp.call_tool("generate_image", args)
            assert done.structured_content["status"] == "completed", done.content[0]
            ref = done.structured_content["images"][0]
            data = base64.b64decode((await mcp.read_resource(ref["uri"])).contents[0].blob)
            refused = await mcp.call_tool("generate_image", {**args, "sharpness": 5})
    finally:
        runtime.close()
    assert data.startswith(b"\x89PNG")
    assert refused.is_error and "unsupported_for_model" in refused.content[0].text
    assert "sharpness" in refused.content[0].text


# -- CLI ----------------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    from hooocus.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_same_bytes_twice_from_image_and_sharpness_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    common = ["--data-dir", tmp_path / "data", "--width", "64", "--height", "64", "--no-progress", "--json"]
    runs = [run_cli(capsys, "generate", "x", "--model", "demo-flux", "--seed", "1", *common) for _ in range(2)]
    assert [code for code, _, _ in runs] == [0, 0], runs
    first, second = (json.loads(out) for _, out, _ in runs)
    assert first["path"] != second["path"] and Path(first["path"]).read_bytes() == Path(second["path"]).read_bytes()
    code, out, err = run_cli(capsys, "generate", "--from-image", first["path"], *common)
    assert code == 0, err
    assert Path(json.loads(out)["path"]).read_bytes() == Path(first["path"]).read_bytes()
    code, out, err = run_cli(capsys, "generate", "x", "--model", "demo-flux", "--seed", "1", "--sharpness", "5", *common)
    assert code == 2 and out == "" and "unsupported_for_model" in err and "sharpness" in err
