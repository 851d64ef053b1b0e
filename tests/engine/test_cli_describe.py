"""``hooocus describe IMG`` (issue 16) in-process, with the tiny describe models in the data folder
(the real loaders), missing weights, and bad files (one stderr line, stable code, exit code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.core.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from hooocus.cli import main
from tests.images import solid_png

BLUE_TAGS = "hatsune miku, smile, ribbon \\(hair\\), blue theme"


def _png(tmp_path: Path, color: tuple[int, int, int] = (0, 0, 255)) -> Path:
    path = tmp_path / "in.png"
    path.write_bytes(solid_png(30, 20, color))
    return path


def test_describe_prints_the_prompt_and_styles(tmp_path: Path, describe_models_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = str(describe_models_dir.parent)
    image = str(_png(tmp_path))
    assert main(["describe", image, "--mode", "anime", "--data-dir", data_dir, "--device", "cpu"]) == EXIT_OK
    prompt, styles = capsys.readouterr().out.splitlines()
    assert prompt == BLUE_TAGS and styles == "styles: Fooocus V2, Fooocus Masterpiece"
    assert main(["describe", image, "--json", "--data-dir", data_dir, "--device", "cpu"]) == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "photo" and result["prompt"] and result["styles"][0] == "Fooocus V2"


def test_describe_without_weights_names_the_setup_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["describe", str(_png(tmp_path)), "--mode", "anime", "--data-dir", str(tmp_path / "empty")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_FAILED and len(err) == 1
    assert "[model_missing]" in err[0] and "model.onnx" in err[0] and "hooocus setup --only describe" in err[0]


def test_describe_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert main(["describe", str(junk), "--data-dir", str(tmp_path)]) == EXIT_USAGE
    assert "[invalid_image]" in capsys.readouterr().err
    assert main(["describe", str(tmp_path / "nope.png"), "--data-dir", str(tmp_path)]) == EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err
    assert main(["describe", str(junk), "--mode", "sketch"]) == EXIT_USAGE
    assert main(["describe", str(junk), "--server", "http://x"]) == EXIT_USAGE
