"""Golden: the inpaint engine's tensor rules (spec §12.2) against refdata/weights/ and parity run g.

- ``inpaint_denoiser_wrapper.*``: Fooocus's ``patched_KSamplerX0Inpaint_forward`` called twice on one
  object with a stub model; every input constant (seed, σs, stub factor, latent scale) is parsed
  from the JSON's own description.
- the ``fooocus`` cases of ``patch_weights.*``, read through our ``.fooocus.patch`` loader.
- ``inpaint_head0.feed`` of parity run g.
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

from engine.sdxl.models.inpaint import (
    PATCH_KEY_SEPARATOR,
    InpaintDenoiser,
    energy_seed,
    fooocus_patches_from_state_dict,
    inpaint_head_feed,
)
from engine.sdxl.models.patching import apply_patches
from tests.paths import parity_runs_where, refdata_dir

_WEIGHTS = refdata_dir() / "weights"
_WRAPPER: dict[str, Any] = (json.loads((_WEIGHTS / "inpaint_denoiser_wrapper.json").read_text())
                            if (_WEIGHTS / "inpaint_denoiser_wrapper.json").is_file() else {})
_PATCH_JSON: dict[str, Any] = (json.loads((_WEIGHTS / "patch_weights.json").read_text())
                               if (_WEIGHTS / "patch_weights.json").is_file() else {})
_FOOOCUS_CASES = [c for c in _PATCH_JSON.get("results", []) if c.startswith("fooocus")]
_FLOAT32_ULP = 2.0 ** -23


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    if match is None:
        pytest.fail(f"{pattern!r} not found in the golden description {text!r}")
    return float(match.group(1))


def _wrapper_inputs() -> dict[str, Any]:
    source, rule = _WRAPPER.get("source", ""), _WRAPPER.get("rule", "")
    sigmas = re.search(r"sigma ([\d.]+) then ([\d.]+)", source)
    assert sigmas is not None, source
    return {
        "seed": int(_number(r"seed=(\d+)", source)),
        "sigmas": [float(s) for s in sigmas.groups()],
        "stub_factor": _number(r"returning ([\d.]+)\*x", source),
        "scaling_factor": _number(r"\(x([\d.]+) for SDXL\)", rule),
    }


def test_inpaint_golden_files_present() -> None:
    assert _WRAPPER, "inpaint_denoiser_wrapper.json missing"
    assert _FOOOCUS_CASES, "no fooocus cases in patch_weights.json"


@pytest.fixture(scope="module")
def wrapper_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(_WEIGHTS / "inpaint_denoiser_wrapper.safetensors"))


def test_denoiser_wrapper_matches_fooocus(wrapper_tensors: dict[str, torch.Tensor]) -> None:
    """Both calls on one object: the second call's energy continues the same generator.

    Tolerance: the energy is torch's CPU ``randn`` (Box–Muller: log, sin/cos), which the refdata README
    measures as up to 1 ulp different on another CPU; scaled by σ and added to the latent, a result
    element can be off by about 2 ulp of its own magnitude. We allow 4 ulp of the largest magnitude
    in each expected tensor, with no relative term.
    """
    given = _wrapper_inputs()
    t = wrapper_tensors
    wrapper = InpaintDenoiser(t["current_task_latent"], t["latent_mask"], given["seed"],
                              scaling_factor=given["scaling_factor"])
    seen: list[torch.Tensor] = []

    def stub_model(x_in: torch.Tensor) -> torch.Tensor:
        seen.append(x_in.clone())
        return given["stub_factor"] * x_in

    x = t["x_in"].clone()
    for step, sigma in enumerate(given["sigmas"]):
        out = wrapper(stub_model, x, torch.tensor([sigma]))
        for got, key in ((seen[-1], f"step{step}_model_input"), (out, f"step{step}_out")):
            bound = 4 * _FLOAT32_ULP * float(t[key].abs().max())
            torch.testing.assert_close(got, t[key], atol=bound, rtol=0.0, msg=key)
    assert torch.equal(x, t["x_in"])  # the sampler's x is not modified in place
    # The known region comes back as the scaled latent, untouched by the model.
    known = t["latent_mask"].expand_as(x) == 0
    torch.testing.assert_close(out[known], (t["current_task_latent"] * given["scaling_factor"])[known],
                               atol=0.0, rtol=0.0)


def test_denoiser_wrapper_generator_lives_across_calls(wrapper_tensors: dict[str, torch.Tensor]) -> None:
    """The second golden call needs the generator state the first call left: a fresh wrapper misses it."""
    given = _wrapper_inputs()
    t = wrapper_tensors
    seen: list[torch.Tensor] = []
    fresh = InpaintDenoiser(t["current_task_latent"], t["latent_mask"], given["seed"],
                            scaling_factor=given["scaling_factor"])
    fresh(lambda v: seen.append(v) or v, t["x_in"], torch.tensor([given["sigmas"][1]]))
    assert (seen[0] - t["step1_model_input"]).abs().max() > 1e-3
    assert energy_seed(given["seed"]) == given["seed"] + 1


@pytest.mark.parametrize("case", _FOOOCUS_CASES)
def test_fooocus_patch_file_merges_like_fooocus(case: str) -> None:
    """Exact: dequantise-and-add is elementwise float32 with no transcendental, the same on any CPU."""
    strength = _number(r"fooocus_uint8_strength(-?[\d.]+)$", case)
    tensors = load_file(str(_WEIGHTS / "patch_weights.safetensors"))
    key = "diffusion_model.input_blocks.0.0.weight"
    state = {f"{key}{PATCH_KEY_SEPARATOR}w": tensors["fooocus_w_uint8"],
             f"{key}{PATCH_KEY_SEPARATOR}min": tensors["fooocus_min"],
             f"{key}{PATCH_KEY_SEPARATOR}max": tensors["fooocus_max"]}
    patches = fooocus_patches_from_state_dict(state)
    assert list(patches) == [key]
    merged = apply_patches(tensors["W0"], [(patches[key], strength)])
    torch.testing.assert_close(merged, tensors[case], atol=0.0, rtol=0.0)


def _has_head_feed(folder: Path) -> bool:
    inputs = folder / "image_inputs.safetensors"
    if not inputs.is_file():
        return False
    with safe_open(str(inputs), "pt") as f:
        return "inpaint_head0.feed" in f.keys()


@pytest.mark.parametrize("folder", parity_runs_where("inpaint head", _has_head_feed))
def test_inpaint_head_feed_matches_parity_runs(folder: Path) -> None:
    recorded = load_file(str(folder / "image_inputs.safetensors"))
    scaling = _wrapper_inputs()["scaling_factor"]
    feed = inpaint_head_feed(recorded["encode_vae_inpaint0.latent_mask"], recorded["encode_vae_inpaint0.latent_inpaint"],
                             scaling_factor=scaling)
    torch.testing.assert_close(feed, recorded["inpaint_head0.feed"], atol=0.0, rtol=0.0)
