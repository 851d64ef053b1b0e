"""Sampling starts for image tasks (engine/sdxl/img2img.py): the partial-denoise start without
√(1+σ²), the full-denoise inpaint start, "disable initial latent", and the parity runs' first x."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.sdxl.img2img import initial_x, inpaint_start_latent, partial_denoise_sigmas
from engine.sdxl.models.loading import SDXL_VAE_SCALING_FACTOR
from engine.sdxl.sampling.model_sampling import DiscreteEPS, is_max_denoise
from engine.sdxl.sampling.noise import prepare_noise
from tests.paths import parity_runs_where

SIGMA_MAX = DiscreteEPS().sigma_max


def _latent(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(seed))


def test_partial_denoise_start_adds_noise_times_sigma0_without_the_sqrt_factor() -> None:
    plan = partial_denoise_sigmas("dpmpp_2m_sde_gpu", "karras", 6, 0.5)
    sigma0 = plan.sigmas[0]
    assert float(sigma0) < SIGMA_MAX and len(plan.sigmas) == 7 and float(plan.sigmas[-1]) == 0.0
    latent, noise = _latent(0), _latent(1)
    x = initial_x(latent, noise, sigma0, scaling_factor=SDXL_VAE_SCALING_FACTOR)
    assert torch.equal(x, noise * sigma0 + latent * SDXL_VAE_SCALING_FACTOR)


def test_full_denoise_start_uses_sqrt_one_plus_sigma_squared() -> None:
    plan = partial_denoise_sigmas("dpmpp_2m_sde_gpu", "karras", 6, 1.0)
    sigma0 = plan.sigmas[0]
    assert math.isclose(float(sigma0), SIGMA_MAX, rel_tol=1e-6)
    latent, noise = _latent(0), _latent(1)
    x = initial_x(latent, noise, sigma0, scaling_factor=SDXL_VAE_SCALING_FACTOR)
    assert torch.equal(x, noise * torch.sqrt(1.0 + sigma0**2.0) + latent * SDXL_VAE_SCALING_FACTOR)
    assert torch.equal(initial_x(None, noise, sigma0, scaling_factor=SDXL_VAE_SCALING_FACTOR),
                       noise * torch.sqrt(1.0 + sigma0**2.0))


def test_disable_initial_latent_starts_inpaint_from_pure_noise() -> None:
    fill, noise = _latent(2), _latent(3)
    sigma0 = torch.tensor(SIGMA_MAX)
    assert inpaint_start_latent(fill, disable_initial_latent=False) is fill
    zero = inpaint_start_latent(fill, disable_initial_latent=True)
    assert zero.shape == fill.shape and not zero.any()
    pure = initial_x(zero, noise, sigma0, scaling_factor=SDXL_VAE_SCALING_FACTOR)
    assert torch.equal(pure, initial_x(None, noise, sigma0, scaling_factor=SDXL_VAE_SCALING_FACTOR))
    assert not torch.equal(pure, initial_x(fill, noise, sigma0, scaling_factor=SDXL_VAE_SCALING_FACTOR))


def _derived(folder: Path) -> dict:
    return json.loads((folder / "params.json").read_text(encoding="utf-8"))["derived"]


def _image_run(folder: Path) -> bool:
    return "initial_latent_vae_space" in load_file(folder / "latent.safetensors")


@pytest.mark.parametrize("folder", parity_runs_where("image-input", _image_run))
def test_parity_sigmas_and_first_x(folder: Path) -> None:
    """Vary (0.5), Upscale (0.382) and Inpaint (1.0): our plan gives Fooocus's sigmas, and
    initial_x(VAE-space input latent, prepare_noise(seed)) is its step-0 x bit for bit."""
    derived = _derived(folder)
    plan = partial_denoise_sigmas(derived["sampler"], derived["scheduler"], derived["steps"], derived["denoise"])
    assert torch.equal(plan.sigmas, torch.tensor(derived["sigmas"], dtype=torch.float32))
    latents = load_file(folder / "latent.safetensors")
    with safe_open(str(folder / "trajectory.safetensors"), "pt") as handle:
        first_x = handle.get_tensor("step00.x")
    assert is_max_denoise(DiscreteEPS(), float(plan.sigmas[0])) == derived["max_denoise_start"]
    noise, _generator = prepare_noise(derived["task_seed"], first_x.shape)
    x = initial_x(latents["initial_latent_vae_space"], noise, plan.sigmas[0], scaling_factor=SDXL_VAE_SCALING_FACTOR)
    assert torch.equal(x, first_x)
