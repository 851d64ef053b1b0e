"""Issue 16 Enhance through the HTTP and websocket doors on the demo model with tiny random mask
models installed where set-up puts them (tests/enhance_models.py): the passes run on a generated or an
uploaded image, bad enhance fields are errors with the stable code and the field path (nothing queued),
a missing mask model is model_missing naming the file and the set-up command, and a cancel in the
middle of the passes leaves the next job fine.

Passes here are Upscale (Fast 2x) (no diffusion) and tabs that find nothing (skipped): a real inpaint
pass samples a 1024² crop (tens of seconds on 2 CPU cores, tests/engine/test_enhance_demo.py)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.enhance_models import install_tiny_enhance_models
from tests.images import noise_png
from tests.ws.conftest import ALICE, WsReader, auth, connect, make_app

PARAMS = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 1, "seed": 5, "styles": []}
NOTHING = {"detection_prompt": "face", "box_threshold": 1.0}


@pytest.fixture
def demo(tmp_path: Path):
    from engine.core.runtime import create_runtime
    from engine.core.settings import Settings

    settings = Settings(data_dir=tmp_path, shutdown_grace_s=1.0)
    install_tiny_enhance_models(settings.models_dir)
    runtime = create_runtime(settings, model="demo")
    with TestClient(make_app(runtime)) as client:
        yield client, runtime


def _upload(client: TestClient) -> str:
    response = client.post("/v1/uploads", content=noise_png(48, 40, seed=7),
                           headers={**auth(ALICE), "Content-Type": "image/png"})
    assert response.status_code == 201, response.text
    return "sha256:" + response.json()["sha256"]


def test_http_enhance_on_a_generated_and_an_uploaded_image(demo) -> None:
    client, runtime = demo
    headers = {**auth(ALICE), "accept": "application/json"}
    enhance = {"uov_method": "Upscale (Fast 2x)", "uov_processing_order": "After Last Enhancement", "tabs": [NOTHING]}
    response = client.post("/v1/generate", headers=headers, json={**PARAMS, "enhance": enhance})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "done" and [i["width"] for i in body["images"]] == [64, 1024]  # generated, then 2x
    assert body["params"]["enhance"]["tabs"][0]["detection_prompt"] == "face"
    ref = _upload(client)
    only = client.post("/v1/generate", headers=headers, json={
        **PARAMS, "input_image": ref, "enhance": {**enhance, "save_only_final": True}}).json()
    assert only["state"] == "done" and len(only["images"]) == 1  # enhance-only: the final image alone
    assert only["images"][0]["width"] > 48  # the upload's upscale, not a 64 px generation


@pytest.mark.parametrize("enhance,code,loc", [
    ({"tabs": [{"mask_model": "sam"}]}, "invalid_request", ["enhance", "tabs", 0, "detection_prompt"]),
    ({"tabs": [{"mask_model": "u2net", "erode_or_dilate": 99}]}, "invalid_request",
     ["enhance", "tabs", 0, "erode_or_dilate"]),
    ({"tabs": [NOTHING, {"mask_model": "isnet-anime"}]}, "model_missing", ["enhance", "tabs", 1, "mask_model"]),
    ({"tabs": [{**NOTHING, "sam_model": "vit_h"}]}, "model_missing", ["enhance", "tabs", 0, "mask_model"]),
])
def test_http_bad_enhance_is_refused_with_its_path(demo, enhance: dict[str, Any], code: str, loc: list[Any]) -> None:
    client, runtime = demo
    jobs = len(runtime.engine.jobs())
    response = client.post("/v1/generate", headers=auth(ALICE), json={**PARAMS, "enhance": enhance})
    assert response.status_code in (409, 422), response.text  # model_missing is 409 (errors.py)
    error = response.json()["error"]
    assert error["code"] == code and error["loc"] == loc, error
    if code == "model_missing":
        assert "hooocus setup --only enhance" in error["message"]
    assert len(runtime.engine.jobs()) == jobs  # nothing queued


class _HeldMasks:
    """Wraps the runner's mask generator: the first mask waits until the test lets it go, so a cancel
    lands in the middle of the passes on every run (no race with a fast tiny model)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.entered = threading.Event()
        self.release = threading.Event()

    def make(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        self.release.wait(30)
        return self.real.make(*args, **kwargs)


def test_websocket_enhance_and_a_cancel_mid_enhance(demo) -> None:
    client, runtime = demo
    runner = runtime.engine.runners[0].sdxl  # the device's FamilyRunner -> its SDXL runner
    with connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "generate", "id": "bad", "params": {**PARAMS, "enhance": {"tabs": [{}]}}})
        error = reader.until_type("error")[-1]
        assert error["code"] == "invalid_request" and error["loc"] == ["params", "enhance", "tabs", 0,
                                                                      "detection_prompt"], error
        held = _HeldMasks(runner.enhance_masks())
        runner._enhance_masks = held
        reader.send({"type": "generate", "id": "c", "params": {**PARAMS, "enhance": {"tabs": [NOTHING, NOTHING]}}})
        accepted = reader.until_type("accepted")[-1]
        assert held.entered.wait(60)  # the generation is done, the first pass's mask is being made
        job = runtime.engine.get_job(accepted["job_id"])
        reader.send({"type": "cancel", "job_id": accepted["job_id"]})
        while not job.cancel_token.is_set():
            threading.Event().wait(0.01)
        held.release.set()
        messages = reader.until_type("cancelled", "done")
        assert messages[-1]["type"] == "cancelled"
        assert [m for m in messages if m["type"] == "image"]  # the generated image came before the cancel
        assert not [m for m in messages if m.get("code") == "enhance_skipped"]  # no pass finished
        runner._enhance_masks = held.real
        reader.send({"type": "generate", "id": "g", "params": {**PARAMS, "enhance": {
            "uov_method": "Upscale (Fast 2x)", "tabs": [NOTHING]}}})
        messages = reader.until_type("done", "error", "cancelled")
        assert messages[-1]["type"] == "done", messages[-1]
        images = [m for m in messages if m["type"] == "image"]
        assert [m["index"] for m in images] == [0, 1] and images[1]["width"] == 1024
        assert [m for m in messages if m["type"] == "warning" and m["code"] == "enhance_skipped"]


@pytest.mark.slow
def test_http_enhance_only_with_a_rembg_tab_repaints_its_mask(demo) -> None:
    """A real inpaint pass through the HTTP door (a 1024² crop on the demo UNet: tens of seconds)."""
    import io

    import numpy as np
    from PIL import Image

    client, _runtime = demo
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32, 0] = 255
    rgb[:, 32:, 2] = 255  # the tiny rembg model's mask is the blue half
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    response = client.post("/v1/uploads", content=buffer.getvalue(), headers={**auth(ALICE), "Content-Type": "image/png"})
    ref = "sha256:" + response.json()["sha256"]
    out = client.post("/v1/generate", headers={**auth(ALICE), "accept": "image/png"}, json={
        **PARAMS, "input_image": ref, "enhance": {"tabs": [{"mask_model": "u2netp", "inpaint_engine": "None"}]}})
    assert out.status_code == 200, out.text
    got = np.array(Image.open(io.BytesIO(out.content)).convert("RGB"))
    assert got.shape == rgb.shape and not np.array_equal(got[:, 40:], rgb[:, 40:])
