"""``hooocus generate`` image-task flags (issue 14): --image/--vary/--upscale/--mask/--outpaint/
--inpaint-mode/--inpaint-engine become contract14's request fields; local mode sends the files as
data URIs, --server uploads them over the websocket (text message or binary frame) and sends
``sha256:`` references; wrong combinations are one line and exit code 2."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.core.settings import settings_from_args
from hooocus import cli
from hooocus.cli import build_parser, main, request_fields_from_args
from tests.images import InputsRecorder

pytestmark = pytest.mark.usefixtures("isolated_cli_env")  # tests/engine/conftest.py


def picture(path: Path, size: tuple[int, int] = (40, 24), fmt: str = "PNG", *, noise: bool = False) -> Path:
    rgb = (np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) if noise
           else np.full((size[1], size[0], 3), 200, np.uint8))
    Image.fromarray(rgb).save(path, format=fmt)
    return path


def fields(*argv: str | Path, uploads: dict[str, bytes] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(["generate", "x", *(str(a) for a in argv)])
    settings, _ = settings_from_args(args)
    return request_fields_from_args(args, settings, uploads)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def decoded(uri: str) -> Image.Image:
    head, _, b64 = uri.partition(",")
    assert head in ("data:image/png;base64", "data:image/jpeg;base64", "data:image/webp;base64")
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize("flags, expected", [
    (["--vary", "subtle"], {"uov_method": "Vary (Subtle)"}),
    (["--vary", "strong"], {"uov_method": "Vary (Strong)"}),
    (["--upscale", "1.5x"], {"uov_method": "Upscale (1.5x)"}),
    (["--upscale", "2x"], {"uov_method": "Upscale (2x)"}),
    (["--upscale", "fast-2x"], {"uov_method": "Upscale (Fast 2x)"}),
    (["--outpaint", "top, LEFT,top"], {"outpaint_selections": ["Left", "Top"]}),
    (["--outpaint", "right", "--inpaint-mode", "detail", "--inpaint-engine", "v1"],
     {"outpaint_selections": ["Right"], "inpaint_mode": "Improve Detail (face, hand, eyes, etc.)",
      "inpaint_engine": "v1"}),
])
def test_task_flags_become_the_contract_fields(tmp_path: Path, flags: list[str], expected: dict) -> None:
    got = fields("--image", picture(tmp_path / "in.png"), *flags)
    assert {k: got.get(k) for k in expected} == expected
    assert decoded(got["input_image"]).size == (40, 24)


def test_mask_is_the_inpaint_mask_and_other_formats_become_png(tmp_path: Path) -> None:
    got = fields("--image", picture(tmp_path / "in.bmp", fmt="BMP"), "--mask", picture(tmp_path / "m.jpg", fmt="JPEG"))
    assert got["input_image"].startswith("data:image/png;base64,")  # BMP cannot be named by a data URI
    assert got["inpaint_mask"].startswith("data:image/jpeg;base64,")
    assert np.array_equal(np.asarray(decoded(got["input_image"])), np.asarray(Image.open(tmp_path / "in.bmp")))
    assert "uov_method" not in got


@pytest.mark.parametrize("flags, needle", [
    (["--vary", "subtle"], "--image PATH is required for Vary (Subtle)"),
    (["--outpaint", "left"], "--image PATH is required for outpaint left"),
    (["--mask", "MASK"], "--image PATH is required for inpaint"),
    (["--image", "IMG"], "--image: nothing to do with the image"),
    (["--image", "IMG", "--vary", "subtle", "--upscale", "2x"], "--vary and --upscale exclude each other"),
    (["--image", "IMG", "--vary", "subtle", "--mask", "MASK"], "--mask is not used with --vary/--upscale"),
    (["--image", "IMG", "--upscale", "2x", "--outpaint", "top"], "--outpaint is not used with --vary/--upscale"),
    (["--image", "missing.png", "--vary", "subtle"], "--image: no file at missing.png"),
    (["--image", "IMG", "--outpaint", "middle"], "expected a comma list of left, right, top, bottom"),
    (["--image", "IMG", "--upscale", "3x"], "invalid choice: '3x'"),
])
def test_wrong_combinations_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                    flags: list[str], needle: str) -> None:
    image, mask = picture(tmp_path / "in.png"), picture(tmp_path / "m.png")
    argv = [str(image) if f == "IMG" else str(mask) if f == "MASK" else f for f in flags]
    code, out, err = run(capsys, "generate", "x", "--model", "demo", "--no-progress", *argv)
    assert code == 2 and out == "" and needle in err and len(err.strip().splitlines()) == 1, err


def test_an_input_over_the_upload_cap_is_refused_before_reading(capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = picture(tmp_path / "big.png", (256, 256), noise=True)
    monkeypatch.setenv("HOOOCUS_MAX_UPLOAD_BYTES", str(big.stat().st_size - 1))
    code, _out, err = run(capsys, "generate", "x", "--model", "demo", "--image", big, "--vary", "subtle")
    assert code == 2 and "over the" in err and "input cap" in err, err


def test_from_image_of_a_vary_image_asks_for_the_input_image(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    made_with_vary = tmp_path / "vary.png"
    picture(made_with_vary)
    # What the metadata reader gives for a Fooocus image made with Vary (the input image is not in it).
    monkeypatch.setattr(cli, "_start_request", lambda args, settings: {"prompt": "a cat", "uov_method": "Vary (Subtle)"})
    code, _out, err = run(capsys, "generate", "--model", "demo", "--from-image", made_with_vary)
    assert code == 2 and f"--from-image: {made_with_vary} was made with Vary (Subtle)" in err
    assert "give that image with --image PATH" in err
    got = fields("--from-image", made_with_vary, "--image", picture(tmp_path / "in.png"))
    assert got["uov_method"] == "Vary (Subtle)" and got["input_image"].startswith("data:image/png")


def test_server_mode_uploads_the_files_and_sends_sha256_references(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path) -> None:
    from tests.ws.conftest import ALICE, make_app, make_runtime, start_server

    runner = InputsRecorder()
    runtime = make_runtime(tmp_path / "server", runner)
    live = start_server(make_app(runtime), runtime)
    # One file under the 64 KiB text frame cap (upload message), one over it (binary upload frame).
    image = picture(tmp_path / "in.png", (64, 48))
    mask = picture(tmp_path / "mask.png", (160, 160), noise=True)
    assert image.stat().st_size < 16 * 1024 and mask.stat().st_size > 64 * 1024
    try:
        base = live.ws_url.removesuffix("/v1/ws")
        code, out, err = run(capsys, "generate", "x", "--server", base, "--token", ALICE, "--image", image,
                             "--mask", mask, "--json", "--out", tmp_path / "out", "--no-progress")
        assert code == 0, err
        assert len(out.splitlines()) == 1 and json.loads(out)["sha256"]
        job = runtime.engine.jobs()[-1]
        assert job.request.input_image == "sha256:" + hashlib.sha256(image.read_bytes()).hexdigest()
        assert job.request.inpaint_mask == "sha256:" + hashlib.sha256(mask.read_bytes()).hexdigest()
        seen = runner.seen[job.job_id]
        assert seen["input_image"].shape == (48, 64, 3) and seen["inpaint_mask"].shape == (160, 160)
    finally:
        live.stop()
