"""Golden: the Control-LoRA softness factors (spec §12.3) against refdata/weights/controlnet_softness.json.

The file records Fooocus's factors for its default softness; both the softness and the factors are
read from it. The factors are float64 results of one short expression, so they must match exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.sdxl.control.softness import DEFAULT_SOFTNESS, scale_control_outputs, softness_factors


@pytest.fixture(scope="module")
def softness_data(refdata: Path) -> dict[str, Any]:
    return json.loads((refdata / "weights" / "controlnet_softness.json").read_text())


def test_default_softness_is_fooocus_default(softness_data: dict[str, Any]) -> None:
    assert DEFAULT_SOFTNESS == softness_data["default_softness"]


def test_softness_factors_match_fooocus(softness_data: dict[str, Any]) -> None:
    expected = softness_data["factors_for_default"]
    assert list(softness_factors(softness_data["default_softness"], len(expected))) == expected


def test_scaled_outputs_use_the_recorded_factors(softness_data: dict[str, Any]) -> None:
    """Each of the 9 down residuals and the middle one is scaled by its recorded factor (then strength)."""
    expected = softness_data["factors_for_default"]
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64) for _ in expected]
    down, mid = scale_control_outputs(outs[:-1], outs[-1], strength=0.6, softness=softness_data["default_softness"])
    for got, raw, factor in zip([*down, mid], outs, expected, strict=True):
        torch.testing.assert_close(got, raw * factor * 0.6, atol=0, rtol=0)
