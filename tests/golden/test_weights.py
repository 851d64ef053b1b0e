"""Golden: weight patch math (spec §11.1) and FreeU V2 (spec §11.4) against refdata/weights/.

The other files of refdata/weights/ have their own modules: ``ip_adapter_attention`` in
test_ip_adapter_attention.py, ``controlnet_softness`` in test_controlnet_softness.py and
``inpaint_denoiser_wrapper`` in test_inpaint_weights.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.sdxl.models.freeu import fourier_filter, freeu_v2_output_block
from engine.sdxl.models.patching import DiffPatch, FooocusPatch, LoraPatch, WeightPatch, apply_patches
from tests.paths import refdata_dir

ATOL = 1e-5

# A case name is one or more patches joined by "+", each in the README's naming:
#   lora_strength<s>_alpha<a>_rank<r> | lora_strength<s>_no_alpha | diff_strength<s> | fooocus_uint8_strength<s>
_PATCH_RE = re.compile(r"^(?:lora_strength(?P<lora_s>-?[\d.]+)_(?:alpha(?P<alpha>-?[\d.]+)_rank(?P<rank>\d+)|no_alpha)"
                       r"|diff_strength(?P<diff_s>-?[\d.]+)|fooocus_uint8_strength(?P<foo_s>-?[\d.]+))$")
# Case names the README does not spell out. "two_loras": the stored up/down applied twice, first as
# the alpha-2 case at strength 0.7, then at strength -0.3 without alpha (inferred: the only such pair
# of coefficients that reproduces the stored tensor bit for bit; net 0.05·up@down).
_NAMED_CASES = {"two_loras": "lora_strength0.7_alpha2_rank4+lora_strength-0.3_no_alpha"}


def _weights_dir() -> Path:
    return refdata_dir() / "weights"


def _json(name: str) -> dict[str, Any]:
    path = _weights_dir() / name
    return json.loads(path.read_text()) if path.is_file() else {}


def _keys(name: str) -> list[str]:
    path = _weights_dir() / name
    if not path.is_file():
        return []
    with safe_open(str(path), framework="pt") as handle:
        return sorted(handle.keys())


_PATCH_CASES: list[str] = _json("patch_weights.json").get("results", [])
_FREEU = _json("freeu_v2.json")
_FREEU_CHANNELS = sorted({int(m.group(1)) for k in _keys("freeu_v2.safetensors")
                          if (m := re.fullmatch(r"h_(\d+)_in", k))}, reverse=True)


def _patches_for(case: str, tensors: dict[str, torch.Tensor]) -> list[tuple[WeightPatch, float]]:
    patches: list[tuple[WeightPatch, float]] = []
    for part in _NAMED_CASES.get(case, case).split("+"):
        match = _PATCH_RE.match(part)
        if match is None:
            pytest.fail(f"patch case name {part!r} not understood; extend the grammar in this test")
        if match["lora_s"] is not None:
            alpha = float(match["alpha"]) if match["alpha"] is not None else None
            if match["rank"] is not None:
                assert tensors["lora_down"].shape[0] == int(match["rank"])
            patches.append((LoraPatch(up=tensors["lora_up"], down=tensors["lora_down"], alpha=alpha),
                            float(match["lora_s"])))
        elif match["diff_s"] is not None:
            patches.append((DiffPatch(tensors["diff"]), float(match["diff_s"])))
        else:
            patches.append((FooocusPatch(tensors["fooocus_w_uint8"], tensors["fooocus_min"], tensors["fooocus_max"]),
                            float(match["foo_s"])))
    return patches


@pytest.fixture(scope="module")
def patch_tensors(refdata: Path) -> dict[str, torch.Tensor]:
    return load_file(str(refdata / "weights" / "patch_weights.safetensors"))


@pytest.fixture(scope="module")
def freeu_tensors(refdata: Path) -> dict[str, torch.Tensor]:
    return load_file(str(refdata / "weights" / "freeu_v2.safetensors"))


def test_weights_golden_files_present(refdata: Path) -> None:
    assert _PATCH_CASES, "no patch_weights results found"
    assert _FREEU_CHANNELS, "no freeu_v2 cases found"


@pytest.mark.parametrize("case", _PATCH_CASES)
def test_patch_math_matches_fooocus(case: str, patch_tensors: dict[str, torch.Tensor]) -> None:
    weight = patch_tensors["W0"]
    merged = apply_patches(weight, _patches_for(case, patch_tensors))
    torch.testing.assert_close(merged, patch_tensors[case], atol=ATOL, rtol=ATOL)
    # The input is never modified (unmerge relies on untouched originals).
    assert not torch.equal(merged, weight)


@pytest.mark.parametrize("case", _PATCH_CASES)
def test_patch_math_keeps_weight_dtype(case: str, patch_tensors: dict[str, torch.Tensor]) -> None:
    weight = patch_tensors["W0"].to(torch.float16)
    merged = apply_patches(weight, _patches_for(case, patch_tensors))
    assert merged.dtype == torch.float16
    torch.testing.assert_close(merged, patch_tensors[case].to(torch.float16), atol=2e-3, rtol=2e-3)


def _freeu_factors() -> dict[str, Any]:
    """b1/b2/s1/s2 and model_channels as the JSON states them (source call and rule)."""
    factors = {k: float(v) for k, v in re.findall(r"\b([bs][12])=(-?[\d.]+)", _FREEU.get("source", ""))}
    channels = re.search(r"model_channels=(\d+)", _FREEU.get("rule", ""))
    return {**factors, "model_channels": int(channels.group(1)) if channels else 320}


@pytest.mark.parametrize("channels", _FREEU_CHANNELS)
def test_freeu_v2_matches_fooocus(channels: int, freeu_tensors: dict[str, torch.Tensor]) -> None:
    factors = _freeu_factors()
    assert set(factors) == {"b1", "b2", "s1", "s2", "model_channels"}
    h_in, hsp_in = freeu_tensors[f"h_{channels}_in"], freeu_tensors[f"hsp_{channels}_in"]
    h_before, hsp_before = h_in.clone(), hsp_in.clone()
    h_out, hsp_out = freeu_v2_output_block(h_in, hsp_in, **factors)
    torch.testing.assert_close(h_out, freeu_tensors[f"h_{channels}_out"], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(hsp_out, freeu_tensors[f"hsp_{channels}_out"], atol=ATOL, rtol=ATOL)
    assert torch.equal(h_in, h_before) and torch.equal(hsp_in, hsp_before)


def test_diffusers_builtin_freeu_is_not_fooocus_v2(freeu_tensors: dict[str, torch.Tensor]) -> None:
    """Why we hook ourselves: diffusers' apply_freeu has the same skip filter but V1's constant backbone."""
    from diffusers.utils.torch_utils import apply_freeu

    factors = _freeu_factors()
    channels = factors["model_channels"] * 4
    if channels not in _FREEU_CHANNELS:
        pytest.skip("no 4x model_channels case in this data")
    h_in, hsp_in = freeu_tensors[f"h_{channels}_in"], freeu_tensors[f"hsp_{channels}_in"]
    h_out, hsp_out = apply_freeu(0, h_in.clone(), hsp_in.clone(), b1=factors["b1"], b2=factors["b2"],
                                 s1=factors["s1"], s2=factors["s2"])
    torch.testing.assert_close(hsp_out, freeu_tensors[f"hsp_{channels}_out"], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(fourier_filter(hsp_in, threshold=1, scale=factors["s1"]), hsp_out,
                               atol=ATOL, rtol=ATOL)
    assert (h_out - freeu_tensors[f"h_{channels}_out"]).abs().max() > 1e-3
