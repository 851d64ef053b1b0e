"""Golden: Latent2RGB preview (spec §16) against refdata/latent_preview/latent_formats.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.sdxl.preview import latent_rgb_factors, latent_to_rgb
from tests.paths import refdata_dir


def _data() -> dict[str, Any]:
    path = refdata_dir() / "latent_preview" / "latent_formats.json"
    return json.loads(path.read_text()) if path.is_file() else {}


_DATA = _data()
_FORMATS = sorted(_DATA.get("formats", {}).items())
_EXAMPLE = _DATA.get("latent2rgb_example")
_EXAMPLES = _DATA.get("latent2rgb_examples", [_EXAMPLE] if _EXAMPLE else [])


def test_latent_preview_golden_file_present(refdata: Path) -> None:
    assert (refdata / "latent_preview" / "latent_formats.json").is_file()
    assert _FORMATS and _EXAMPLES


@pytest.mark.parametrize(("name", "fmt"), _FORMATS, ids=[name for name, _ in _FORMATS])
def test_rgb_factors_match_reference(name: str, fmt: dict[str, Any]) -> None:
    torch.testing.assert_close(latent_rgb_factors(name),
                               torch.tensor(fmt["latent_rgb_factors"], dtype=torch.float32), atol=0, rtol=0)


@pytest.mark.parametrize("example", _EXAMPLES, ids=[f"example{i}" for i in range(len(_EXAMPLES))])
def test_latent2rgb_output_is_byte_exact(example: dict[str, Any]) -> None:
    x0 = torch.tensor(example["x0"], dtype=torch.float32)
    expected = np.asarray(example["output_uint8_hwc"], dtype=np.uint8)
    out = latent_to_rgb(x0, latent_format=example.get("format", "SDXL"))
    assert out.dtype == np.uint8
    assert out.shape == expected.shape == (x0.shape[-2], x0.shape[-1], 3)
    np.testing.assert_array_equal(out, expected)
