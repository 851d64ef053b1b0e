"""Describe at the websocket door (issue 16): ``POST /v1/describe`` and the ``describe`` message, with
the tiny describe models through the real loaders; image references as issue 14 defines them; bad
input with stable codes and field paths, nothing run; cancel through ``cancel``."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from engine.core.runtime import Runtime
from engine.core.settings import Settings
from engine.describe.service import Describer
from tests.images import data_uri, solid_png
from tests.ws.conftest import ALICE, BOB, READER, auth, open_session

BLUE_TAGS = "hatsune miku, smile, ribbon \\(hair\\), blue theme"


@pytest.fixture
def runtime(runtime: Runtime, describe_models_dir: Path) -> Runtime:
    describer = Describer(Settings(data_dir=describe_models_dir.parent, device="cpu"),
                          resolve_image=runtime.engine.resolve_inputs.resolve_one,
                          device_lock=runtime.engine.device_lock)
    runtime.describer = describer
    yield runtime
    describer.close()


def _upload(client: TestClient, data: bytes, token: str = ALICE) -> str:
    response = client.post("/v1/uploads", content=data, headers={**auth(token), "Content-Type": "image/png"})
    assert response.status_code == 201, response.text
    return "sha256:" + response.json()["sha256"]


def test_http_describe_by_upload_reference(client: TestClient) -> None:
    ref = _upload(client, solid_png(40, 30, (0, 0, 255)))
    response = client.post("/v1/describe", json={"image": ref, "mode": "anime"}, headers=auth(ALICE))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prompt"] == BLUE_TAGS and body["styles"] == ["Fooocus V2", "Fooocus Masterpiece"]
    photo = client.post("/v1/describe", json={"image": data_uri(solid_png(16, 16, (9, 9, 9)))}, headers=auth(ALICE))
    assert photo.status_code == 200 and photo.json()["mode"] == "photo" and photo.json()["prompt"]
    assert "/v1/describe" in client.get("/openapi.json").json()["paths"]


def test_http_describe_bad_input(client: TestClient, runtime: Runtime) -> None:
    ref = _upload(client, solid_png(8, 8, (0, 0, 255)))
    cases = [(BOB, {"image": ref}, 404, "not_found", ["image"]),  # someone else's upload
             (ALICE, {"image": ref, "mode": "sketch"}, 422, "invalid_request", ["mode"]),
             (ALICE, {"image": "not-a-ref"}, 422, "invalid_request", ["image"]),
             (ALICE, {"image": data_uri(b"junk")}, 422, "invalid_image", ["image"]),
             (ALICE, {"image": ref, "extra": True}, 422, "invalid_request", ["extra"]),
             (ALICE, {}, 422, "invalid_request", ["image"])]
    for token, body, status, code, loc in cases:
        response = client.post("/v1/describe", json=body, headers=auth(token))
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["code"] == code and response.json()["error"].get("loc") == loc
    assert client.post("/v1/describe", json={"image": ref}, headers=auth(READER)).status_code == 403
    assert client.post("/v1/describe", json={"image": ref}).status_code == 401
    assert runtime.describer.get_task("anything") is None and not runtime.describer._tasks


def test_ws_describe_then_cancel(client: TestClient, runtime: Runtime) -> None:
    cm, reader = open_session(client)
    try:
        reader.send({"type": "describe", "id": 1, "image": data_uri(solid_png(24, 24, (0, 0, 255))), "mode": "anime"})
        ack = reader.until_type("ack")[-1]
        assert ack["re"] == 1 and ack["job_id"].startswith("d_")
        result = reader.until_type("describe_result")[-1]
        assert result["re"] == 1 and result["describe_id"] == ack["job_id"] and result["prompt"] == BLUE_TAGS

        reader.send({"type": "describe", "id": 2, "image": "sha256:" + "0" * 64})
        error = reader.until_type("error")[-1]
        assert (error["re"], error["code"], error["loc"]) == (2, "not_found", ["image"])

        # A generation holds the device: the describe waits, and `cancel` with its id ends it.
        runtime.engine.device_lock.acquire()
        try:
            reader.send({"type": "describe", "id": 3, "image": data_uri(solid_png(8, 8, (1, 2, 3))), "mode": "both"})
            describe_id = reader.until_type("ack")[-1]["job_id"]
            reader.send({"type": "cancel", "id": 4, "job_id": describe_id})
            messages = reader.until(lambda m: m["type"] == "error" and m.get("re") == 3)
            assert any(m["type"] == "ack" and m["re"] == 4 and m["job_id"] == describe_id for m in messages)
            assert messages[-1]["code"] == "cancelled"
        finally:
            runtime.engine.device_lock.release()
        reader.send({"type": "describe", "id": 5, "image": data_uri(solid_png(8, 8, (0, 0, 255))), "mode": "anime"})
        assert reader.until_type("describe_result")[-1]["prompt"] == BLUE_TAGS
    finally:
        cm.__exit__(None, None, None)


def test_cli_describe_on_a_server(runtime: Runtime, live_factory, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``hooocus describe IMG --server``: upload, then POST /v1/describe on a real uvicorn."""
    from hooocus.cli import main

    live = live_factory(runtime)
    image = tmp_path / "in.png"
    image.write_bytes(solid_png(30, 20, (0, 0, 255)))
    server = f"ws://127.0.0.1:{live.port}"
    assert main(["describe", str(image), "--mode", "anime", "--server", server, "--token", ALICE]) == 0
    assert capsys.readouterr().out.splitlines()[0] == BLUE_TAGS
    assert main(["describe", str(image), "--server", server, "--token", READER]) == 1
    assert "[forbidden]" in capsys.readouterr().err
