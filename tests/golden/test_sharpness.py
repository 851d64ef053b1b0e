"""Golden tests for refdata/sharpness: Fooocus's anisotropic (joint bilateral) filter (spec §5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from engine.sdxl.sampling.anisotropic import (
    KERNEL_SIZE,
    SIGMA_SPACE,
    adaptive_anisotropic_filter,
    gaussian_kernel2d,
)
from tests.paths import refdata_dir

ATOL = 1e-5
RTOL = 1e-5

_PATH = refdata_dir() / "sharpness" / "anisotropic_filter.json"
CASES: list[dict[str, Any]] = json.loads(_PATH.read_text()).get("cases", []) if _PATH.is_file() else []


@pytest.fixture(scope="module")
def tensors(refdata: Path) -> dict[str, torch.Tensor]:
    return load_file(str(refdata / "sharpness" / "anisotropic_filter.safetensors"))


def test_gaussian_kernel(tensors: dict[str, torch.Tensor]) -> None:
    expected = tensors[f"gaussian_kernel2d_{KERNEL_SIZE}_sigma{SIGMA_SPACE:g}"]
    torch.testing.assert_close(gaussian_kernel2d()[None], expected, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_adaptive_anisotropic_filter(case: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    name = case["name"]
    x = tensors[f"{name}_x"]
    assert list(x.shape) == case["shape"]
    guide = tensors.get(f"{name}_g")  # absent: x guides itself
    torch.testing.assert_close(adaptive_anisotropic_filter(x, guide), tensors[f"{name}_out"], atol=ATOL, rtol=RTOL)
