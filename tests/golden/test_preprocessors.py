"""Golden: the PyraCanny and CPDS preprocessors (spec §12.3) against refdata/preprocessors/.

Cases come from ``preprocessors.json`` ``files`` at collection time: every file except the input is
one recorded output, and its name says which preprocessor made it (``canny_pyramid_<low>_<high>``
or ``cpds``), so another data folder with other thresholds works unchanged.

Tolerance: exact (0 grey levels). Measured, not assumed: with this repository's pinned
opencv-python-headless 4.10.0.84 and numpy 2.4.6, both maps equal Fooocus's files (made with
opencv-contrib-python-headless 4.10.0.84, numpy 1.26.4) in every pixel (max |diff| 0 of 20,480
pixels each), ``cv2.decolor`` included. The README warns that ``cv2.decolor`` may differ across
OpenCV builds; we have only the pinned build to measure, so a different OpenCV is a re-measurement,
and the failure message names both versions to say so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.imaging.preprocessors import canny_pyramid, cpds
from tests.paths import refdata_dir

_FOLDER = refdata_dir() / "preprocessors"
_INDEX = _FOLDER / "preprocessors.json"
_DATA: dict[str, Any] = json.loads(_INDEX.read_text()) if _INDEX.is_file() else {}
_INPUT = "input.png"
_OUTPUTS = sorted(name for name in _DATA.get("files", {}) if name != _INPUT)


def _preprocessor(name: str) -> Any:
    """The function (with its recorded arguments) that made the file ``name``."""
    stem = Path(name).stem
    if m := re.fullmatch(r"canny_pyramid_(\d+)_(\d+)", stem):
        low, high = int(m.group(1)), int(m.group(2))
        return lambda image: canny_pyramid(image, low, high)
    if stem == "cpds":
        return cpds
    raise AssertionError(f"{name}: no preprocessor known for this recorded output")


def test_preprocessor_cases_present() -> None:
    assert _INPUT in _DATA.get("files", {}), f"{_INDEX} names no {_INPUT}"
    assert _OUTPUTS, f"{_INDEX} lists no outputs"


@pytest.mark.parametrize("name", _OUTPUTS)
def test_preprocessor_matches_fooocus(name: str) -> None:
    image = np.array(Image.open(_FOLDER / _INPUT).convert("RGB"))
    expected = np.array(Image.open(_FOLDER / name))
    before = image.copy()
    got = _preprocessor(name)(image)
    assert np.array_equal(image, before), "the input image was modified"
    assert got.dtype == np.uint8 and got.shape == expected.shape
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() == 0, (f"{name}: {int((diff > 0).sum())} pixels differ, max {int(diff.max())} grey levels "
                             f"(recorded with OpenCV {_DATA.get('opencv')}, running {cv2.__version__}: "
                             "re-measure the tolerance for this build)")
