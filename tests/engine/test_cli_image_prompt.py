"""``hooocus generate --image-prompt PATH[:TYPE[:WEIGHT[:STOP]]]`` (issue 16): the flag's parsing,
its request fields (local data URIs; ``--server`` sha256 references plus the bytes to upload), and a
local run on the demo model where the slots change the image (FaceSwap included: it crops the face)."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.core.request import GenerationRequest
from hooocus.cli import main
from hooocus.image_flags import image_prompt_fields, parse_image_prompt
from tests.face_models import face_picture

pytestmark = pytest.mark.usefixtures("isolated_cli_env")  # tests/engine/conftest.py


def _picture(path: Path) -> Path:
    image = np.random.default_rng(5).integers(0, 60, (40, 48, 3), dtype=np.uint8)
    image[8:30, 10:36] = 220
    Image.fromarray(image).save(path)
    return path


@pytest.mark.parametrize(("text", "want"), [
    ("a.png", {"path": Path("a.png"), "type": "ImagePrompt"}),
    ("a.png:cpds", {"path": Path("a.png"), "type": "CPDS"}),
    ("a.png:PyraCanny:1.5:0.4", {"path": Path("a.png"), "type": "PyraCanny", "weight": 1.5, "stop_at": 0.4}),
    ("a.png:canny::0.3", {"path": Path("a.png"), "type": "PyraCanny", "stop_at": 0.3}),
    ("C:/x/a.png:ip:0.9", {"path": Path("C:/x/a.png"), "type": "ImagePrompt", "weight": 0.9}),
    ("face.png:faceswap:0.8", {"path": Path("face.png"), "type": "FaceSwap", "weight": 0.8}),
])
def test_parse_image_prompt(text: str, want: dict) -> None:
    assert parse_image_prompt(text) == want


@pytest.mark.parametrize("text", ["a.png:cpds:heavy", "a.png:cpds:1:0.5:9", ":cpds"])
def test_parse_image_prompt_refuses_bad_text(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_image_prompt(text)


def test_fields_local_and_server(tmp_path: Path) -> None:
    path = _picture(tmp_path / "ref.png")
    flags = [parse_image_prompt(f"{path}:cpds:0.8"), parse_image_prompt(str(path))]
    local, uploads = image_prompt_fields(argparse.Namespace(image_prompts=flags, server=None),
                                         max_bytes=1 << 20, max_pixels=1 << 20)
    assert uploads == {} and local[0]["image"].startswith("data:image/png;base64,")
    request = GenerationRequest.parse({"image_prompts": local})
    assert [(s.type, s.resolved_weight) for s in request.image_prompts] == [("CPDS", 0.8), ("ImagePrompt", 0.6)]
    remote, uploads = image_prompt_fields(argparse.Namespace(image_prompts=flags, server="ws://x"),
                                          max_bytes=1 << 20, max_pixels=1 << 20)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert [s["image"] for s in remote] == [f"sha256:{sha}"] * 2
    assert set(uploads) == {"image_prompts.0.image", "image_prompts.1.image"}


def test_five_flags_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _picture(tmp_path / "ref.png")
    code = main(["generate", "x", "--model", "demo", "--data-dir", str(tmp_path / "data"), "--no-progress",
                 *[arg for _ in range(5) for arg in ("--image-prompt", str(path))]])
    assert code == 2 and "at most 4" in capsys.readouterr().err


def test_cli_local_image_prompt_on_the_demo_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _picture(tmp_path / "ref.png")

    def generate(*flags: str) -> np.ndarray:
        code = main(["generate", "x", "--model", "demo", "--seed", "9", "--steps", "2", "--width", "64",
                     "--height", "64", "--no-progress", "--json", "--data-dir", str(tmp_path / "data"),
                     "--out", str(tmp_path / "out"), *flags])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        (row,) = [json.loads(line) for line in captured.out.splitlines()]
        with Image.open(row["path"]) as image:
            return np.asarray(image.convert("RGB"))

    plain = generate()
    prompted = generate("--image-prompt", f"{path}:ImagePrompt:1.0:1.0", "--image-prompt", f"{path}:cpds")
    assert plain.shape == prompted.shape == (64, 64, 3) and not np.array_equal(prompted, plain)
    # FaceSwap: the demo detector's face, at two places of the picture, gives one crop and one image.
    faces = []
    for name, cell in (("here.png", (1, 1)), ("there.png", (2, 2))):
        Image.fromarray(face_picture(128, 128, cell=cell)).save(tmp_path / name)
        faces.append(generate("--image-prompt", f"{tmp_path / name}:faceswap"))
    assert not np.array_equal(faces[0], plain) and np.array_equal(faces[0], faces[1])
