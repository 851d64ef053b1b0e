"""``hooocus generate --image PATH`` in local mode on the demo model (issue 14: every task through
every door): the CLI reads a local file, the real SDXL pipeline runs the task, the file lands with its
Fooocus size and metadata. Fast 2x runs no diffusion (fast); Vary runs at the 1024 shape ceil on the
demo UNet (slow-marked, ~30–60 s on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.imaging.sizes import upscale_plan
from engine.io.imageio import read_image_metadata
from hooocus.cli import main

pytestmark = pytest.mark.usefixtures("isolated_cli_env")  # tests/engine/conftest.py


def _picture(path: Path, width: int, height: int) -> Path:
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _generate(capsys: pytest.CaptureFixture[str], tmp_path: Path, *flags: str) -> dict:
    code = main(["generate", "x", "--model", "demo", "--seed", "9", "--no-progress", "--json",
                 "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (row,) = [json.loads(line) for line in captured.out.splitlines()]
    return row


def test_cli_local_image_fast_upscale(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = _picture(tmp_path / "in.png", 40, 24)
    row = _generate(capsys, tmp_path, "--image", str(source), "--upscale", "fast-2x")
    height, width = upscale_plan(24, 40, 2.0, sr_scale=4).result_hw
    with Image.open(row["path"]) as image:
        assert image.size == (width, height)
    stored = json.loads(read_image_metadata(Path(row["path"]).read_bytes())[0])
    assert stored["upscale_fast"] == "2x"  # Fooocus logs Fast 2x as this one entry (spec §12.1), no prompt


@pytest.mark.slow
def test_cli_local_image_vary_subtle(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = _picture(tmp_path / "in.png", 64, 64)
    row = _generate(capsys, tmp_path, "--image", str(source), "--vary", "subtle", "--steps", "2")
    with Image.open(row["path"]) as image:
        assert image.size == (1024, 1024)  # Vary generates at its shape ceil, clamped to [1024, 2048]
    stored = json.loads(read_image_metadata(Path(row["path"]).read_bytes())[0])
    # Fooocus logs no UOV entry (spec §13.1); the resolution is the generated one.
    assert stored["prompt"] == "x" and stored["resolution"] == "(1024, 1024)"
