"""Image tasks over plain HTTP on the demo model (issue 14: every task through every door):
``POST /v1/uploads`` then ``POST /v1/generate`` with ``sha256:`` references, the real SDXL pipeline
(tiny demo weights), the PNG back with the sizes Fooocus gives. Upscale (Fast 2x) runs no diffusion,
so it is fast; inpaint generates a 1024² crop on the demo UNet (~40–60 s on 2 cores), so it is slow."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from engine.core.runtime import create_runtime
from engine.core.settings import Settings
from engine.imaging.sizes import upscale_plan
from tests.images import noise_png
from tests.ws.conftest import ALICE, auth, make_app


def _upload(client: TestClient, data: bytes) -> str:
    response = client.post("/v1/uploads", content=data, headers={**auth(ALICE), "Content-Type": "image/png"})
    assert response.status_code == 201, response.text
    return "sha256:" + response.json()["sha256"]


def _png_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.array(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_http_upload_then_fast_upscale_on_the_demo_model(tmp_path: Path) -> None:
    runtime = create_runtime(Settings(data_dir=tmp_path, shutdown_grace_s=1.0), model="demo")
    with TestClient(make_app(runtime)) as client:
        ref = _upload(client, noise_png(64, 48, seed=3))
        body = {"prompt": "x", "seed": 1, "styles": [], "uov_method": "Upscale (Fast 2x)", "input_image": ref}
        first = _png_of(client.post("/v1/generate", headers={**auth(ALICE), "accept": "image/png"}, json=body))
        second = _png_of(client.post("/v1/generate", headers={**auth(ALICE), "accept": "image/png"}, json=body))
    height, width = upscale_plan(48, 64, 2.0, sr_scale=4).result_hw
    assert first.shape == (height, width, 3)
    assert np.array_equal(first, second)  # no diffusion, no randomness: the same pixels every time


@pytest.mark.slow
def test_http_inpaint_with_an_uploaded_mask_on_the_demo_model(tmp_path: Path) -> None:
    rgb = np.array(Image.open(io.BytesIO(noise_png(160, 128, seed=4))).convert("RGB"))
    mask = np.zeros((128, 160, 3), np.uint8)
    mask[56:72, 72:88] = 255
    runtime = create_runtime(Settings(data_dir=tmp_path, shutdown_grace_s=1.0), model="demo")
    with TestClient(make_app(runtime)) as client:
        image_ref = _upload(client, noise_png(160, 128, seed=4))
        buffer = io.BytesIO()
        Image.fromarray(mask).save(buffer, format="PNG")
        mask_ref = _upload(client, buffer.getvalue())
        out = _png_of(client.post("/v1/generate", headers={**auth(ALICE), "accept": "image/png"}, json={
            "prompt": "x", "seed": 2, "steps": 2, "styles": [], "input_image": image_ref,
            "inpaint_mask": mask_ref}))
    assert out.shape == rgb.shape  # Fooocus pastes the generated crop back into the input's size
    # color_correction blends with the soft mask, which reaches 32 px beyond the mask (spec §12.2:
    # 32 rounds of a 3×3 dilation); beyond that the pixels are exactly the input's.
    far = np.ones((128, 160), bool)
    far[56 - 33:72 + 33, 72 - 33:88 + 33] = False
    assert np.array_equal(out[far], rgb[far])
    assert not np.array_equal(out[56:72, 72:88], rgb[56:72, 72:88])  # inside the mask it generated
