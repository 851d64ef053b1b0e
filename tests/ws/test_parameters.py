"""POST /v1/parameters: an image's generation parameters, read with engine.io.metadata (one parser)."""

from __future__ import annotations

import io

from PIL import Image
from starlette.testclient import TestClient

from engine.core.request import GenerationRequest
from engine.core.testing import FakeRunner
from engine.io.metadata import request_from_image
from tests.paths import refdata_dir
from tests.ws.conftest import ALICE, auth, make_app, make_runtime

FOOOCUS_PNG = refdata_dir() / "metadata" / "case1_fooocus_png.png"


def test_a_fooocus_png_gives_the_parameters_this_server_can_run(tmp_path):
    runner = FakeRunner()
    data = FOOOCUS_PNG.read_bytes()
    with TestClient(make_app(make_runtime(tmp_path, runner))) as client:
        response = client.post("/v1/parameters", headers=auth(ALICE), content=data)
        assert response.status_code == 200, response.text
        body = response.json()
        # The same reading the CLI does, against this server's installed names (the FakeRunner has
        # the model "demo" only and no LoRAs: the file's checkpoint and LoRA are dropped with a warning).
        options = runner.options()
        expected, warnings = request_from_image(data, known_models=options["models"], known_loras=options["loras"],
                                                known_styles=options["styles"])
        assert body == {"params": expected.model_dump(mode="json", exclude_unset=True), "warnings": warnings}
        unrestricted, _ = request_from_image(data)
        assert unrestricted.base_model and "base_model" not in body["params"]
        assert unrestricted.loras and "loras" not in body["params"]
        assert any("not installed" in w for w in body["warnings"])
        # What comes back is a request this server accepts as it is.
        GenerationRequest.parse(body["params"])
        accepted = client.post("/v1/generate", headers=auth(ALICE), json={**body["params"], "steps": 1})
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["seeds"] == [str(unrestricted.seed)]


def test_bad_bodies_get_clear_errors_and_nothing_is_queued(tmp_path):
    runtime = make_runtime(tmp_path)
    runtime.settings = runtime.settings.model_copy(update={"max_upload_bytes": 4096})
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")  # an image without generation parameters
    with TestClient(make_app(runtime)) as client:
        assert client.post("/v1/parameters", content=b"x").status_code == 401
        cases = {b"not an image at all": "cannot read image metadata", plain.getvalue(): "no generation parameters",
                 b"": "empty", b"\x89PNG" + b"0" * 4096: "larger than 4096 bytes"}
        for body, words in cases.items():
            response = client.post("/v1/parameters", headers=auth(ALICE), content=body)
            error = response.json()["error"]
            assert response.status_code == 422 and error["code"] == "invalid_request", (body[:10], response.text)
            assert words in error["message"], error
        assert runtime.engine.jobs() == []


def test_a1111_style_names_come_back_on_a_real_server(tmp_path):
    """A1111 metadata keeps only the styled prompt text; the server's style library turns it back into
    style names. On a real server the engine's runner is the device's FamilyRunner (issue 17), which
    must hand the library on, or /v1/parameters (and the page's drop-an-image) silently loses the styles."""
    from engine.core.runtime import create_runtime
    from engine.core.settings import Settings

    runtime = create_runtime(Settings(data_dir=tmp_path, device="cpu"), model="demo", record_history=False)
    with TestClient(make_app(runtime)) as client:
        job = runtime.engine.submit({"prompt": "a lighthouse", "styles": ["Hooocus Cinematic"], "seed": 3,
                                     "steps": 1, "width": 64, "height": 64, "metadata_scheme": "a1111"})
        assert job.wait(120) and job.images, job.events_after(0)[-1]
        response = client.post("/v1/parameters", headers=auth(ALICE), content=job.images[0].data)
        assert response.status_code == 200, response.text
        # (Fooocus's A1111 reader also names "Fooocus V2" when prompt text is left beside a found style;
        # tests/golden/test_metadata.py holds that rule to Fooocus's cases.)
        assert "Hooocus Cinematic" in response.json()["params"]["styles"]
