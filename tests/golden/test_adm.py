"""Golden: negative ADM guidance (spec §4) against refdata/adm/ — every case in the files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.sdxl.conditioning.adm import (
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

ATOL = 1e-5  # refdata/README.md's start for single float32 functions (pooled copies, sin/cos values)
EMB_PREFIX = "timestep_embedding_256_of_"
EMPHASIZED_KEY = "emphasized_numbers_[h,w,crop_h,crop_w,target_h,target_w]"
CONSISTENT_KEY = "consistent_numbers_[h,w,crop_h,crop_w,target_h,target_w]"


def embedding_tolerance(numbers: torch.Tensor) -> torch.Tensor:
    """Per-element bound for ``timestep_embedding_256(numbers)`` across CPUs: [N, 256].

    Another CPU's float32 ``exp`` gives 5 of the 128 frequencies f_k 1 ulp apart
    (refdata/README.md). The argument v·f_k then moves by v·ulp(f_k) <= v·f_k·2^-23 < 2·ulp(v·f_k)
    (ulp(x) > x·2^-24), and |d cos| = |d sin| <= |d arg|. Bound: 2·ulp(|v·f_k|) plus ATOL for the
    1-ulp difference of sin/cos themselves. At v = 1152 that is 2.5e-4 for k = 0 (measured on the
    second machine: 3-6e-5); a size 1 px off moves the same element by ~0.5 (test below).
    """
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (numbers.reshape(-1, 1).float() * freqs[None]).abs()
    ulp = torch.nextafter(args, torch.tensor(math.inf)) - args
    return (ATOL + 2 * ulp).repeat(1, 2)


def assert_embedding_close(actual: torch.Tensor, expected: torch.Tensor, numbers: torch.Tensor) -> None:
    """``actual``/``expected``: embeddings of ``numbers`` (any shape with numel = len·256)."""
    tolerance = embedding_tolerance(numbers).reshape(actual.shape)
    excess = (actual - expected).abs() - tolerance
    assert bool((excess <= 0).all()), (
        f"embedding off by {float((actual - expected).abs().max()):.3g}; worst excess {float(excess.max()):.3g}")


def assert_adm_close(actual: torch.Tensor, expected: torch.Tensor, halves: list[list[float]]) -> None:
    """A [1, 2816·k] ADM vector: each half is pooled (ATOL) then the embedding of its six numbers."""
    for j, numbers in enumerate(halves):
        half = slice(j * 2816, (j + 1) * 2816)
        torch.testing.assert_close(actual[:, half][:, :1280], expected[:, half][:, :1280], atol=ATOL, rtol=ATOL)
        assert_embedding_close(actual[:, half][:, 1280:], expected[:, half][:, 1280:], torch.tensor(numbers))


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
    halves = [case[EMPHASIZED_KEY], case[CONSISTENT_KEY]]
    if case.get("tensor_key"):
        assert_adm_close(vector, adm_tensors[case["tensor_key"]], halves)
    else:
        # No stored vector: the layout must still be [pooled, emb(emphasized), pooled, emb(consistent)].
        emb_e = timestep_embedding_256(torch.tensor(case[EMPHASIZED_KEY])).flatten()
        emb_c = timestep_embedding_256(torch.tensor(case[CONSISTENT_KEY])).flatten()
        expected = torch.cat([pooled[0], emb_e, pooled[0], emb_c])[None]
        torch.testing.assert_close(vector, expected, atol=0, rtol=0)  # same machine, same function


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
    numbers = torch.tensor([float(v) for v in key[len(EMB_PREFIX):].split("_")])
    assert_embedding_close(timestep_embedding_256(numbers), adm_tensors[key], numbers)


def _embedding_with_freqs(numbers: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    args = numbers.reshape(-1, 1) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@pytest.mark.parametrize("key", _EMB_KEYS)
def test_embedding_tolerance_holds_for_another_cpu_and_catches_mistakes(
        key: str, adm_tensors: dict[str, torch.Tensor]) -> None:
    """Emulate the second machine (every 20th frequency 1 ulp up or down) and two real mistakes."""
    numbers = torch.tensor([float(v) for v in key[len(EMB_PREFIX):].split("_")])
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    for direction in (math.inf, -math.inf):
        moved = freqs.clone()
        moved[::20] = torch.nextafter(freqs[::20], torch.tensor(direction))
        assert_embedding_close(_embedding_with_freqs(numbers, moved), adm_tensors[key], numbers)
    with pytest.raises(AssertionError):  # a size 1 px off (e.g. a rounding mistake in the scaling)
        assert_embedding_close(_embedding_with_freqs(numbers + 1, freqs), adm_tensors[key], numbers)
    with pytest.raises(AssertionError):  # diffusers' default order [sin, cos] instead of [cos, sin]
        swapped = _embedding_with_freqs(numbers, freqs).roll(128, dims=-1)
        assert_embedding_close(swapped, adm_tensors[key], numbers)


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
    # diffusers computes its own frequencies: the same cross-CPU/kernel bound applies.
    assert_adm_close(seen[0], expected[:, :2816], [list(emphasized)])
    assert_adm_close(seen[1], expected[:, 2816:], [list(consistent)])
