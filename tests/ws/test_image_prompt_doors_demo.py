"""Issue 16 Image Prompt through the websocket and HTTP doors on the demo model (the real SDXL
pipeline with tiny weights): an uploaded image used as an image-prompt slot changes the result,
FaceSwap crops the face the demo detector finds (the same face at two places gives one image), a
websocket FaceSwap job cancels cleanly, a bad slot is an error with the stable code and the field
path and nothing is queued for it; the web page offers every slot type."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from hooocus_ws.protocol import FRAME_IMAGE
from tests.face_models import face_picture
from tests.images import noise_png
from tests.ws.conftest import ALICE, WsReader, auth, connect, make_app

PARAMS = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 5, "styles": []}


@pytest.fixture
def demo_client(tmp_path: Path):
    from engine.core.runtime import create_runtime
    from engine.core.settings import Settings

    runtime = create_runtime(Settings(data_dir=tmp_path, shutdown_grace_s=1.0), model="demo")
    with TestClient(make_app(runtime)) as client:
        yield client, runtime


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload(client: TestClient, data: bytes | None = None) -> str:
    response = client.post("/v1/uploads", content=data or noise_png(40, 32, seed=7),
                           headers={**auth(ALICE), "Content-Type": "image/png"})
    assert response.status_code == 201, response.text
    return "sha256:" + response.json()["sha256"]


def _png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_http_image_prompt_changes_the_image_and_bad_slots_are_refused(demo_client) -> None:
    client, runtime = demo_client
    ref = _upload(client)
    headers = {**auth(ALICE), "accept": "image/png"}
    plain = _png(client.post("/v1/generate", headers=headers, json=PARAMS))
    prompted = _png(client.post("/v1/generate", headers=headers, json={
        **PARAMS, "image_prompts": [{"image": ref, "type": "ImagePrompt", "stop_at": 1.0},
                                    {"image": ref, "type": "CPDS"}]}))
    assert plain.shape == prompted.shape == (64, 64, 3) and not np.array_equal(plain, prompted)
    jobs = len(runtime.engine.jobs())
    for slots, code, loc in (([{"image": ref, "type": "Depth"}], "invalid_request", ["image_prompts", 0, "type"]),
                             ([{"image": ref, "type": "FaceSwap", "weight": 3}], "invalid_request",
                              ["image_prompts", 0, "weight"]),
                             ([{"image": "sha256:" + "1" * 64}], "not_found", ["image_prompts", 0, "image"])):
        response = client.post("/v1/generate", headers=headers, json={**PARAMS, "image_prompts": slots})
        assert response.status_code in (404, 422), response.text
        error = response.json()["error"]
        assert error["code"] == code and error["loc"][-3:] == loc, error
    assert len(runtime.engine.jobs()) == jobs  # nothing queued


def test_http_faceswap_uses_the_detected_face(demo_client) -> None:
    client, _runtime = demo_client
    headers = {**auth(ALICE), "accept": "image/png"}
    here = _upload(client, _png_bytes(face_picture(128, 128, cell=(1, 1))))
    there = _upload(client, _png_bytes(face_picture(128, 128, cell=(2, 2))))
    plain = _png(client.post("/v1/generate", headers=headers, json=PARAMS))
    results = [_png(client.post("/v1/generate", headers=headers, json={
        **PARAMS, "image_prompts": [{"image": ref, "type": slot_type}]}))
        for slot_type in ("FaceSwap", "ImagePrompt") for ref in (here, there)]
    face_here, face_there, ip_here, ip_there = results
    assert not np.array_equal(face_here, plain)
    assert np.array_equal(face_here, face_there)  # one face crop, wherever the face was
    assert not np.array_equal(ip_here, ip_there)  # the whole pictures differ


def test_web_page_offers_every_slot_type(demo_client) -> None:
    import re
    from typing import get_args

    from engine.core.request import ImagePromptType

    client, _runtime = demo_client
    page = client.get("/").text
    selects = re.findall(r'<select class="ip-type">(.*?)</select>', page, flags=re.S)
    assert len(selects) == 4
    for options in selects:
        assert re.findall(r"<option>(\w+)</option>", options) == list(get_args(ImagePromptType))


def test_websocket_image_prompt_runs_and_a_cancel_leaves_the_next_job_fine(demo_client) -> None:
    client, _runtime = demo_client
    ref = _upload(client)
    face = _upload(client, _png_bytes(face_picture(96, 96, cell=(1, 1))))
    params = {**PARAMS, "image_prompts": [{"image": ref, "type": "PyraCanny", "weight": 1.5},
                                          {"image": face, "type": "FaceSwap"}]}
    with connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "generate", "id": "bad", "params": {**PARAMS, "image_prompts": [{"image": ref}] * 5}})
        error = reader.until_type("error")[-1]
        assert error["code"] == "invalid_request" and error["loc"] == ["params", "image_prompts"], error
        reader.send({"type": "generate", "id": "c", "params": {**params, "steps": 30}})
        accepted = reader.until_type("accepted")[-1]
        reader.until_type("progress")
        reader.send({"type": "cancel", "job_id": accepted["job_id"]})
        assert reader.until_type("cancelled", "done")[-1]["type"] == "cancelled"
        reader.send({"type": "generate", "id": "g", "params": params})
        messages = reader.until_type("done", "error", "cancelled")
    assert messages[-1]["type"] == "done", messages[-1]
    payload = [p for kind, _, p in reader.frames if kind == FRAME_IMAGE][-1]
    assert Image.open(io.BytesIO(payload)).size == (64, 64)
