"""Golden tests for refdata/cfg: compute_cfg and Fooocus's patched sampling function (spec §5, §6)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from engine.sdxl.sampling.guidance import (
    SHARPNESS_SCALE,
    compute_cfg,
    progress_from_timestep,
    sharpness_sampling_function,
)
from engine.sdxl.sampling.model_sampling import DiscreteEPS
from tests.paths import refdata_dir

ATOL = 1e-5
RTOL = 1e-5
#: spec §6: Fooocus's default adaptive CFG; the sampling-function rows ran with it (see the file's stub note).
DEFAULT_ADAPTIVE_CFG = 7.0

_PATH = refdata_dir() / "cfg" / "cfg_and_sampling_function.json"
DATA: dict[str, Any] = json.loads(_PATH.read_text()) if _PATH.is_file() else {}
CFG_CASES = DATA.get("compute_cfg_cases", [])
SF_CASES = DATA.get("sampling_function_cases", [])


@pytest.fixture(scope="module")
def tensors(refdata: Path) -> dict[str, torch.Tensor]:
    return load_file(str(refdata / "cfg" / "cfg_and_sampling_function.safetensors"))


@pytest.mark.parametrize("case", CFG_CASES, ids=[c["key"] for c in CFG_CASES])
def test_compute_cfg(case: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    out = compute_cfg(tensors["cfg_uncond"], tensors["cfg_cond"], case["cfg_scale"], case["adaptive_cfg"], case["t"])
    torch.testing.assert_close(out, tensors[case["key"]], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", SF_CASES, ids=[c["key"] for c in SF_CASES])
def test_sharpness_sampling_function(case: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    timestep = DiscreteEPS().timestep(torch.tensor(case["sigma"]))
    assert int(timestep) == case["discrete_timestep"]
    progress = progress_from_timestep(timestep)
    assert progress == pytest.approx(case["global_diffusion_progress"], rel=1e-7, abs=1e-7)
    assert SHARPNESS_SCALE * case["sharpness"] * progress == pytest.approx(case["alpha"], rel=1e-7, abs=1e-12)
    x0_neg = tensors["sf_negative_x0"] if case["cfg_scale"] != 1.0 else None
    out = sharpness_sampling_function(
        tensors["sf_x"], tensors["sf_positive_x0"], x0_neg, cfg=case["cfg_scale"], sharpness=case["sharpness"],
        adaptive_cfg=case.get("adaptive_cfg", DEFAULT_ADAPTIVE_CFG), timestep=timestep,
    )
    torch.testing.assert_close(out, tensors[case["key"]], atol=ATOL, rtol=RTOL)
