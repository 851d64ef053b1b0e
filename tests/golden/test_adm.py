"""Golden: negative ADM guidance (spec §4) against refdata/adm/ — every case in the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.conditioning.adm import (
    adm_time_ids,
    refiner_adm_vector,
    refiner_time_ids,
    round_to_64,
    sdxl_adm_vector,
    sdxl_time_ids,
    select_adm_half,
    timestep_embedding_256,
    use_emphasized_adm,
)
from tests.paths import refdata_dir

ATOL = 1e-5
EMB_PREFIX = "timestep_embedding_256_of_"
EMPHASIZED_KEY = "emphasized_numbers_[h,w,crop_h,crop_w,target_h,target_w]"
CONSISTENT_KEY = "consistent_numbers_[h,w,crop_h,crop_w,target_h,target_w]"


def _adm_dir() -> Path:
    return refdata_dir() / "adm"


def _json() -> dict[str, Any]:
    path = _adm_dir() / "negative_adm.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _tensor_keys() -> list[str]:
    path = _adm_dir() / "adm_vectors.safetensors"
    if not path.is_file():
        return []
    with safe_open(str(path), framework="pt") as handle:
        return sorted(handle.keys())


_DATA = _json()
_CASES = _DATA.get("cases", [])
_TIMED = _DATA.get("timed_adm", {}).get("cases", [])
_EMB_KEYS = [key for key in _tensor_keys() if key.startswith(EMB_PREFIX)]


def _case_id(case: dict[str, Any]) -> str:
    return (f"{case['positive_adm_scale']}-{case['negative_adm_scale']}-{case['width']}x{case['height']}-"
            f"{case['prompt_type'] or 'other'}")


@pytest.fixture(scope="module")
def adm_tensors(refdata: Path) -> dict[str, torch.Tensor]:
    return load_file(str(refdata / "adm" / "adm_vectors.safetensors"))


def test_adm_golden_files_present(refdata: Path) -> None:
    assert (refdata / "adm" / "negative_adm.json").is_file()
    assert _CASES and _TIMED, "no ADM cases found"


@pytest.mark.parametrize("case", _CASES, ids=[_case_id(c) for c in _CASES])
def test_time_ids_match_fooocus(case: dict[str, Any]) -> None:
    emphasized, consistent = adm_time_ids(case["width"], case["height"], case["prompt_type"],
                                          positive_scale=case["positive_adm_scale"],
                                          negative_scale=case["negative_adm_scale"])
    assert list(emphasized) == case[EMPHASIZED_KEY]
    assert list(consistent) == case[CONSISTENT_KEY]


@pytest.mark.parametrize("case", _CASES, ids=[_case_id(c) for c in _CASES])
def test_adm_vector_matches_fooocus(case: dict[str, Any], adm_tensors: dict[str, torch.Tensor]) -> None:
    pooled = adm_tensors["pooled_output"]
    vector = sdxl_adm_vector(pooled, case["width"], case["height"], case["prompt_type"],
                             positive_scale=case["positive_adm_scale"], negative_scale=case["negative_adm_scale"])
    assert list(vector.shape) == case["output_shape"]
    if case.get("tensor_key"):
        torch.testing.assert_close(vector, adm_tensors[case["tensor_key"]], atol=ATOL, rtol=ATOL)
    else:
        # No stored vector: the layout must still be [pooled, emb(emphasized), pooled, emb(consistent)].
        emb_e = timestep_embedding_256(torch.tensor(case[EMPHASIZED_KEY])).flatten()
        emb_c = timestep_embedding_256(torch.tensor(case[CONSISTENT_KEY])).flatten()
        expected = torch.cat([pooled[0], emb_e, pooled[0], emb_c])[None]
        torch.testing.assert_close(vector, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("case", _TIMED, ids=[f"end{c['adm_scaler_end']}-t{c['timestep']}" for c in _TIMED])
def test_timed_adm_switch(case: dict[str, Any]) -> None:
    expect_emphasized = case["uses"].startswith("first half")
    assert use_emphasized_adm(case["timestep"], case["adm_scaler_end"]) is expect_emphasized
    y = torch.arange(5632, dtype=torch.float32)[None]
    half = select_adm_half(y, case["timestep"], case["adm_scaler_end"])
    assert half.shape == (1, 2816)
    assert half[0, 0].item() == (0.0 if expect_emphasized else 2816.0)


@pytest.mark.parametrize("key", _EMB_KEYS)
def test_timestep_embedding_256(key: str, adm_tensors: dict[str, torch.Tensor]) -> None:
    # The key names its inputs: timestep_embedding_256_of_1152_896_0 -> embed(1152), embed(896), embed(0).
    numbers = [float(v) for v in key[len(EMB_PREFIX):].split("_")]
    torch.testing.assert_close(timestep_embedding_256(torch.tensor(numbers)), adm_tensors[key],
                               atol=ATOL, rtol=ATOL)


def test_round_to_64_uses_bankers_rounding() -> None:
    assert round_to_64(1056) == 1024  # 16.5 -> 16 (half to even)
    assert round_to_64(1120) == 1152  # 17.5 -> 18
    assert round_to_64(700) == 704
    assert sdxl_time_ids(1000, 700, size_scale=0.8) == (560, 800, 0, 0, 704, 1024)


def test_refiner_time_ids_and_vector() -> None:
    assert refiner_time_ids(1152, 896, 6.0) == (896.0, 1152.0, 0.0, 0.0, 6.0)
    pooled = torch.randn(2, 1280, generator=torch.Generator().manual_seed(0))
    pos = refiner_adm_vector(pooled, 1152, 896, "positive")
    neg = refiner_adm_vector(pooled, 1152, 896, "negative")
    assert pos.shape == (2, 2560)
    torch.testing.assert_close(pos[:, :1280], pooled)
    torch.testing.assert_close(neg[0, 1280 + 4 * 256:], timestep_embedding_256(torch.tensor([2.5]))[0])
    torch.testing.assert_close(pos[0, 1280 + 4 * 256:], timestep_embedding_256(torch.tensor([6.0]))[0])
    # The refiner's 2560-wide y is never split by the timed switch.
    assert select_adm_half(pos, 999.0, 0.3) is pos


@pytest.mark.parametrize("case", [c for c in _CASES if c.get("tensor_key")],
                         ids=[_case_id(c) for c in _CASES if c.get("tensor_key")])
def test_diffusers_add_embedding_path_equals_fooocus_vector(case: dict[str, Any],
                                                            adm_tensors: dict[str, torch.Tensor]) -> None:
    """A diffusers UNet fed our time_ids builds exactly Fooocus's half vectors (spec §4 "In diffusers terms")."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=1280 + 6 * 256,
        use_linear_projection=True, norm_num_groups=32)
    pooled = adm_tensors["pooled_output"]
    emphasized, consistent = adm_time_ids(case["width"], case["height"], case["prompt_type"],
                                          positive_scale=case["positive_adm_scale"],
                                          negative_scale=case["negative_adm_scale"])
    expected = adm_tensors[case["tensor_key"]]
    seen: list[torch.Tensor] = []
    # Capture what the UNet's own forward feeds into add_embedding (text_embeds ‖ add_time_proj(time_ids)).
    handle = unet.add_embedding.register_forward_pre_hook(lambda _module, args: seen.append(args[0].clone()))
    sample = torch.zeros(1, 4, 8, 8)
    context = torch.zeros(1, 3, 32)
    try:
        with torch.no_grad():
            for time_ids in (emphasized, consistent):
                unet(sample, 999, encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.tensor([time_ids], dtype=torch.float32)})
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], expected[:, :2816], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(seen[1], expected[:, 2816:], atol=ATOL, rtol=ATOL)
