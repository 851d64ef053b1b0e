"""``hooocus generate`` Enhance flags (issue 16): ``--enhance DETECT`` starts a tab and the
``--enhance-*`` tab flags after it set that tab; job flags set the uov pass and save-only-final; a tab
flag before any ``--enhance`` or a bad value is refused with a clear message; and a local run on the
demo model with tiny mask models writes the passes' files (enhance-only on ``--image`` too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.core.settings import settings_from_args
from hooocus.cli import build_parser, main, request_fields_from_args

pytestmark = pytest.mark.usefixtures("isolated_cli_env")  # tests/engine/conftest.py


def fields(*argv: str) -> dict[str, Any]:
    args = build_parser().parse_args(["generate", "x", *argv])
    settings, _ = settings_from_args(args)
    return request_fields_from_args(args, settings)


def test_tab_flags_attach_to_the_last_enhance() -> None:
    got = fields("--enhance", "face", "--enhance-prompt", "detailed face", "--enhance-strength", "0.5",
                 "--enhance", "", "--enhance-mask-model", "u2net_cloth_seg", "--enhance-cloth", "upper",
                 "--enhance-invert", "--enhance-uov", "upscale-2x", "--enhance-uov-after",
                 "--enhance-uov-last-prompts", "--enhance-final-only")
    assert got["enhance"] == {
        "tabs": [{"detection_prompt": "face", "prompt": "detailed face", "strength": 0.5},
                 {"detection_prompt": "", "mask_model": "u2net_cloth_seg", "cloth_category": "upper", "invert": True}],
        "uov_method": "Upscale (2x)", "uov_processing_order": "After Last Enhancement",
        "uov_prompt_type": "Last Filled Enhancement Prompts", "save_only_final": True}
    assert "enhance" not in fields("--steps", "2")


def test_bad_enhance_flags_are_clear_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["generate", "x", "--enhance-prompt", "detailed face"])
    assert code == 2 and "give --enhance DETECT before it" in capsys.readouterr().err
    code = main(["generate", "x", "--model", "demo", "--data-dir", str(tmp_path / "d"), "--no-progress",
                 "--enhance", "face", "--enhance-strength", "3"])
    err = capsys.readouterr().err
    assert code != 0 and "enhance.tabs.0.strength" in err and "Traceback" not in err
    code = main(["generate", "x", "--model", "demo", "--data-dir", str(tmp_path / "d"), "--no-progress",
                 "--enhance-final-only"])
    assert code == 2 and "--enhance-final-only needs --enhance DETECT or --enhance-uov" in capsys.readouterr().err
    code = main(["generate", "x", "--model", "demo", "--data-dir", str(tmp_path / "d"), "--no-progress",
                 "--enhance", "face"])
    err = capsys.readouterr().err
    assert code != 0 and "model_missing" in err and "hooocus setup --only enhance" in err


def test_cli_enhance_on_the_demo_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from engine.core.settings import Settings
    from tests.enhance_models import install_tiny_enhance_models

    data = tmp_path / "data"
    install_tiny_enhance_models(Settings(data_dir=data).models_dir, rembg_models=())
    base = ["generate", "x", "--model", "demo", "--seed", "9", "--no-progress", "--json", "--data-dir", str(data),
            "--out", str(tmp_path / "out"), "--width", "64", "--height", "64", "--steps", "1",
            "--enhance", "face", "--enhance-box-threshold", "1", "--enhance-uov", "upscale-fast-2x"]
    assert main(base) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    sizes = [Image.open(row["path"]).size for row in rows]
    assert sizes == [(64, 64), (1024, 1024)]  # the generated image, then the 2x pass (the tab found nothing)
    source = tmp_path / "in.png"
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(source)
    assert main([*base, "--image", str(source), "--enhance-final-only"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and Image.open(rows[0]["path"]).size[0] > 40  # enhance-only: the input's upscale
