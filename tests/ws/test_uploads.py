"""Input images through the websocket door and its HTTP companions (issue 14): POST /v1/uploads,
the websocket ``upload`` message and binary upload frame, per-principal ownership, and bad input
(stable code + field path, nothing queued, the server healthy and the next job fine)."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from engine.core.testing import FakeRunner, StepGate
from hooocus_ws.protocol import FRAME_IMAGE, FRAME_UPLOAD, encode_frame, upload_frame_cap
from tests.images import InputsRecorder, data_uri, noise_png
from tests.ws.conftest import ALICE, BOB, READER, WsReader, auth, connect, make_app, open_session


@pytest.fixture
def fake_runner() -> FakeRunner:
    return InputsRecorder()


def png(width: int = 20, height: int = 10, seed: int = 0) -> bytes:
    return noise_png(width, height, seed)


PARAMS = {"prompt": "p", "steps": 2, "width": 512, "height": 512}


def upload(client: TestClient, data: bytes, token: str = ALICE) -> dict:
    response = client.post("/v1/uploads", content=data, headers={**auth(token), "Content-Type": "image/png"})
    assert response.status_code == 201, response.text
    return response.json()


def test_http_upload_raw_and_multipart_then_generate(client: TestClient, fake_runner: InputsRecorder) -> None:
    data = png()
    raw = upload(client, data)
    assert (raw["width"], raw["height"], raw["content_type"]) == (20, 10, "image/png")
    multi = client.post("/v1/uploads", files={"file": ("in.png", data, "image/png")}, headers=auth(ALICE))
    assert multi.status_code == 201 and multi.json()["sha256"] == raw["sha256"]
    response = client.post("/v1/generate", json={**PARAMS, "uov_method": "Vary (Subtle)", "input_image": f"sha256:{raw['sha256']}"},
                           headers=auth(ALICE))
    assert response.status_code == 200, response.text
    seen = fake_runner.seen[response.json()["job_id"]]
    np.testing.assert_array_equal(seen["input_image"], np.asarray(Image.open(io.BytesIO(data))))


def test_http_upload_is_owned_by_the_principal(client: TestClient) -> None:
    sha = upload(client, png())["sha256"]
    response = client.post("/v1/generate", json={**PARAMS, "uov_method": "Vary (Subtle)", "input_image": f"sha256:{sha}"}, headers=auth(BOB))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found" and response.json()["error"]["loc"] == ["input_image"]
    reader = client.post("/v1/uploads", content=png(), headers={**auth(READER), "Content-Type": "image/png"})
    assert reader.status_code == 403  # a token that may not generate may not upload either
    nobody = client.post("/v1/uploads", content=png(), headers={"Content-Type": "image/png"})
    assert nobody.status_code == 401


def test_http_upload_bad_input(client: TestClient, runtime) -> None:
    cap = runtime.settings.max_upload_bytes
    cases = [
        (b"not an image at all", "image/png", 422, "invalid_image", ["body"]),
        (png()[:40], "image/png", 422, "invalid_image", ["body"]),
        (b"\0" * (cap + 1), "image/png", 413, "image_too_large", ["body"]),
        (png(), "text/plain", 422, "invalid_request", ["content-type"]),
    ]
    for body, ctype, status, code, loc in cases:
        response = client.post("/v1/uploads", content=body, headers={**auth(ALICE), "Content-Type": ctype})
        assert response.status_code == status, (code, response.text)
        assert response.json()["error"]["code"] == code and response.json()["error"]["loc"] == loc
    nofile = client.post("/v1/uploads", files={"other": ("x.png", png(), "image/png")}, headers=auth(ALICE))
    assert nofile.status_code == 422 and nofile.json()["error"]["loc"] == ["file"]
    big = client.post("/v1/uploads", files={"file": ("x.png", b"\0" * (cap + 1), "image/png")}, headers=auth(ALICE))
    assert big.status_code == 413 and big.json()["error"]["code"] == "image_too_large"
    assert len(runtime.uploads) == 0
    assert client.get("/healthz").json()["status"] == "ok"


@pytest.mark.parametrize(("ref", "status", "code"), [
    ("data:image/png;base64,###", 422, "invalid_image"),
    (data_uri(b"GIF87a nope"), 422, "invalid_image"),
    ("sha256:" + "f" * 64, 404, "not_found"),
    ("http://example.com/a.png", 422, "invalid_request"),
])
def test_http_generate_bad_image_ref(client: TestClient, runtime, ref: str, status: int, code: str) -> None:
    response = client.post("/v1/generate", json={**PARAMS, "inpaint_mask": ref, "uov_method": "Vary (Subtle)", "input_image": data_uri(png())},
                           headers=auth(ALICE))
    assert response.status_code == status, response.text
    assert response.json()["error"] == {**response.json()["error"], "code": code, "loc": ["inpaint_mask"]}
    assert runtime.engine.jobs() == []
    ok = client.post("/v1/generate", json={**PARAMS, "uov_method": "Vary (Subtle)", "input_image": data_uri(png())}, headers=auth(ALICE))
    assert ok.status_code == 200 and ok.json()["state"] == "done"


def test_ws_upload_message_and_binary_frame(client: TestClient, fake_runner: InputsRecorder) -> None:
    data = png(seed=3)
    cm, reader = open_session(client)
    try:
        reader.send({"type": "upload", "id": "u1", "data": base64.b64encode(data).decode()})
        uploaded = reader.until_type("uploaded", "error")[-1]
        assert uploaded["type"] == "uploaded" and uploaded["re"] == "u1" and uploaded["width"] == 20
        reader.ws.send_bytes(encode_frame(FRAME_UPLOAD, {"id": "u2"}, png(seed=4)))
        framed = reader.until_type("uploaded", "error")[-1]
        assert framed["type"] == "uploaded" and framed["re"] == "u2" and framed["sha256"] != uploaded["sha256"]
        reader.send({"type": "generate", "id": "g", "params": {
            **PARAMS, "uov_method": "Vary (Subtle)", "input_image": f"sha256:{uploaded['sha256']}", "inpaint_mask": f"sha256:{framed['sha256']}"}})
        accepted = reader.until_type("accepted", "error")[-1]
        assert accepted["type"] == "accepted", accepted
        assert reader.until_type("done", "error", job_id=accepted["job_id"])[-1]["type"] == "done"
    finally:
        cm.__exit__(None, None, None)
    seen = fake_runner.seen[accepted["job_id"]]
    assert seen["input_image"].shape == (10, 20, 3) and seen["inpaint_mask"].shape == (10, 20)
    # bob cannot use alice's uploads over the websocket either
    cm, reader = open_session(client, BOB)
    try:
        reader.send({"type": "generate", "id": "b", "params": {**PARAMS, "uov_method": "Vary (Subtle)", "input_image": f"sha256:{framed['sha256']}"}})
        error = reader.until_type("accepted", "error")[-1]
        assert error["code"] == "not_found" and error["loc"] == ["params", "input_image"]
    finally:
        cm.__exit__(None, None, None)


def test_ws_bad_uploads_and_refs_keep_the_connection(client: TestClient, runtime) -> None:
    cm, reader = open_session(client)
    try:
        reader.send({"type": "upload", "id": 1, "data": "%%%"})
        error = reader.until_type("error")[-1]
        assert (error["re"], error["code"], error["loc"]) == (1, "invalid_image", ["data"])
        reader.send({"type": "upload", "id": 2, "data": base64.b64encode(b"plain text").decode()})
        error = reader.until_type("error")[-1]
        assert (error["re"], error["code"], error["loc"]) == (2, "invalid_image", ["data"])
        reader.ws.send_bytes(encode_frame(FRAME_IMAGE, {"id": 3}, png()))
        error = reader.until_type("error")[-1]
        assert error["code"] == "invalid_message"
        reader.ws.send_bytes(encode_frame(FRAME_UPLOAD, {"id": 4}, png()[:30]))
        error = reader.until_type("error")[-1]
        assert (error["re"], error["code"], error["loc"]) == (4, "invalid_image", ["bytes"])
        reader.send({"type": "generate", "id": 5, "params": {**PARAMS, "uov_method": "Vary (Subtle)", "input_image": "sha256:" + "0" * 64}})
        error = reader.until_type("error", "accepted")[-1]
        assert (error["re"], error["code"], error["loc"]) == (5, "not_found", ["params", "input_image"])
        assert runtime.engine.jobs() == []
        reader.send({"type": "generate", "id": 6, "params": {**PARAMS, "uov_method": "Vary (Subtle)", "input_image": data_uri(png())}})
        accepted = reader.until_type("accepted", "error")[-1]
        assert accepted["type"] == "accepted"
        assert reader.until_type("done", job_id=accepted["job_id"])[-1]["type"] == "done"
    finally:
        cm.__exit__(None, None, None)


def test_ws_oversized_upload_frame_closes_1009(client: TestClient, runtime) -> None:
    cap = upload_frame_cap(runtime.settings.max_upload_bytes)
    with connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        ws.send_bytes(encode_frame(FRAME_UPLOAD, {}, b"\0" * cap))
        closed = ws.receive()
        assert closed["type"] == "websocket.close" and closed["code"] == 1009
    assert client.get("/healthz").json()["status"] == "ok"


def test_ws_cancel_image_job_mid_run_next_job_fine(tmp_path: Path) -> None:
    from tests.ws.conftest import make_runtime

    gate = StepGate(2)
    runner = InputsRecorder(on_step=gate)
    runtime = make_runtime(tmp_path, runner)
    with TestClient(make_app(runtime)) as client:
        cm, reader = open_session(client)
        try:
            params = {**PARAMS, "steps": 5, "input_image": data_uri(png()), "uov_method": "Upscale (Fast 2x)"}
            reader.send({"type": "generate", "id": "v", "params": params})
            victim = reader.until_type("accepted")[-1]["job_id"]
            assert gate.reached.wait(10)
            reader.send({"type": "cancel", "id": "c", "job_id": victim})
            # Release only once the server has taken the cancel: released earlier, the worker may
            # finish the remaining steps first and the job ends 'done' (a race seen under load).
            token = runtime.engine.get_job(victim).cancel_token
            for _ in range(1000):
                if token.is_set():
                    break
                time.sleep(0.01)
            assert token.is_set()
            gate.release()
            assert reader.until_type("cancelled", job_id=victim)[-1]["type"] == "cancelled"
            reader.send({"type": "generate", "id": "n", "params": params})
            nxt = reader.until_type("accepted")[-1]["job_id"]
            assert reader.until_type("done", "error", job_id=nxt)[-1]["type"] == "done"
        finally:
            cm.__exit__(None, None, None)
    assert runner.seen[nxt]["input_image"].shape == (10, 20, 3)


def test_protocol_schema_documents_uploads(client: TestClient) -> None:
    schema = client.get("/v1/protocol.json").json()
    assert schema["frame_kinds"]["upload"] == FRAME_UPLOAD
    assert "UploadMessage" in schema["$defs"] and "UploadedOut" in schema["$defs"]
    assert "/v1/uploads" in client.get("/openapi.json").json()["paths"]
    docs = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert '"upload"' in docs and "uploaded" in docs and "kind 3" in docs
    json.dumps(schema)


def test_ws_demo_image_task_upscale_fast_2x(tmp_path: Path) -> None:
    """The real pipeline on the demo model (run by the lead after pipewire's branch is merged):
    Upscale (Fast 2x) of an uploaded image: Fooocus's 2x size, or shape ceil 1024 when 2x is smaller."""
    from engine.core.runtime import create_runtime
    from engine.core.settings import Settings

    runtime = create_runtime(Settings(data_dir=tmp_path, shutdown_grace_s=1.0), model="demo")
    with TestClient(make_app(runtime)) as client:
        sha = upload(client, png(64, 48))["sha256"]
        cm, reader = open_session(client)
        try:
            reader.send({"type": "generate", "id": "g", "params": {
                "prompt": "x", "steps": 2, "seed": 1, "styles": [], "uov_method": "Upscale (Fast 2x)",
                "input_image": f"sha256:{sha}"}})
            messages = reader.until_type("done", "error", "cancelled")
        finally:
            cm.__exit__(None, None, None)
    assert messages[-1]["type"] == "done", messages[-1]
    image = next(m for m in messages if m["type"] == "image")
    from engine.imaging.sizes import get_shape_ceil, upscale_plan

    h, w = upscale_plan(48, 64, 2.0, sr_scale=4).result_hw  # a 64x48 upload: 2x is under the 1024 ceil
    assert (image["width"], image["height"]) == (w, h) and get_shape_ceil(h, w) == 1024
