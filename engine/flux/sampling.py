"""FLUX.1 sampling as small pure functions: latent packing, position ids, the flow-matching sigma
schedule with its resolution-dependent shift, the Euler step, and the seeded start noise.

Each function reproduces the number diffusers' ``FluxPipeline`` (0.42) and
``FlowMatchEulerDiscreteScheduler`` compute for the same inputs, in the same dtypes and order of
operations, so our latents match stock diffusers to float rounding
(tests/flux/test_flux_vs_diffusers.py). Formulas (Black Forest Labs' reference sampler, as diffusers
implements it):

* 2×2 patches: a [B, C, H, W] latent becomes a [B, (H/2)·(W/2), 4C] token sequence;
* image ids: token (i, j) has position (0, i, j); text tokens have position (0, 0, 0);
* sigmas: ``linspace(1, 1/n, n)``, then for dynamic shifting (dev)
  ``σ' = e^μ / (e^μ + (1/σ - 1))`` with ``μ = m·L + b`` linear in the image token count L between
  (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift); without it (schnell)
  ``σ' = s·σ / (1 + (s-1)·σ)`` with the config's ``shift`` (1.0 = unchanged); a final σ = 0;
* the transformer sees ``t = σ`` (passed as ``(σ·1000)/1000`` as diffusers does) and predicts the
  velocity v = noise − x0; Euler: ``x ← x + (σ_next − σ)·v`` in float32.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

#: diffusers' FlowMatchEulerDiscreteScheduler defaults (the config keys FluxPipeline reads).
DEFAULT_BASE_IMAGE_SEQ_LEN = 256
DEFAULT_MAX_IMAGE_SEQ_LEN = 4096
DEFAULT_BASE_SHIFT = 0.5
DEFAULT_MAX_SHIFT = 1.15
NUM_TRAIN_TIMESTEPS = 1000
#: The VAE downsamples 8×, packing takes 2×2 latent cells: sizes must be multiples of 16 px.
VAE_SCALE_FACTOR = 8
PIXELS_PER_TOKEN_SIDE = 2 * VAE_SCALE_FACTOR
#: Config switches that change the schedule in ways FLUX.1 never uses; refused rather than ignored.
_UNSUPPORTED_SCHEDULE_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                              "shift_terminal", "stochastic_sampling", "use_flow_sigmas")


def latent_hw(width_px: int, height_px: int) -> tuple[int, int]:
    """The unpacked latent (height, width) of an image size, rounded down to even (as FluxPipeline)."""
    return 2 * (int(height_px) // PIXELS_PER_TOKEN_SIDE), 2 * (int(width_px) // PIXELS_PER_TOKEN_SIDE)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2×2 cell becomes one token (channel-major inside)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a latent of ``latent_h`` × ``latent_w`` cells."""
    b, _n, d = tokens.shape
    x = tokens.view(b, latent_h // 2, latent_w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, latent_h, latent_w)


def image_ids(latent_h: int, latent_w: int, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[(H/2)(W/2), 3] rotary positions of the image tokens: (0, row, column)."""
    ids = torch.zeros(latent_h // 2, latent_w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(latent_h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(latent_w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def text_ids(num_tokens: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[num_tokens, 3] zeros: text tokens carry no position in FLUX.1's rotary embedding."""
    return torch.zeros(num_tokens, 3).to(device=device, dtype=dtype)


def shift_mu(image_seq_len: int, scheduler_config: dict[str, Any]) -> float:
    """The resolution-dependent shift μ: linear in the image token count (FluxPipeline calculate_shift)."""
    base_len = scheduler_config.get("base_image_seq_len", DEFAULT_BASE_IMAGE_SEQ_LEN)
    max_len = scheduler_config.get("max_image_seq_len", DEFAULT_MAX_IMAGE_SEQ_LEN)
    base_shift = scheduler_config.get("base_shift", DEFAULT_BASE_SHIFT)
    max_shift = scheduler_config.get("max_shift", DEFAULT_MAX_SHIFT)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def flux_sigmas(steps: int, image_seq_len: int, scheduler_config: dict[str, Any]) -> torch.Tensor:
    """The ``steps + 1`` float32 sigmas (last one 0) of a FLUX.1 run at ``image_seq_len`` image tokens.

    numpy float32 as the scheduler computes them (the float64 linspace is cast first, the shift
    runs in float32), so the values are bit-identical to diffusers'.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    for key in _UNSUPPORTED_SCHEDULE_KEYS:
        if scheduler_config.get(key):
            raise ValueError(f"scheduler config sets {key!r}, which FLUX.1 sampling does not use")
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    if scheduler_config.get("use_dynamic_shifting", False):
        mu = shift_mu(image_seq_len, scheduler_config)
        if scheduler_config.get("time_shift_type", "exponential") == "linear":
            sigmas = mu / (mu + (1 / sigmas - 1))
        else:
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    else:
        shift = float(scheduler_config.get("shift", 1.0))
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    out = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return torch.cat([out, torch.zeros(1)])


def model_timestep(sigma: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """The transformer's timestep input for ``sigma``: (σ·1000 in float32, in ``dtype``) / 1000, as
    FluxPipeline passes it (not σ itself: the round trip changes the last bit sometimes)."""
    t = sigma.to(torch.float32) * NUM_TRAIN_TIMESTEPS
    return t.expand(batch).to(dtype) / NUM_TRAIN_TIMESTEPS


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One flow-matching Euler step in float32, returned in the velocity's dtype (as the scheduler)."""
    return (x.to(torch.float32) + (sigma_next - sigma) * velocity).to(velocity.dtype)


def denoised(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The step's x0 prediction ``x − σ·v`` (x = (1−σ)·x0 + σ·noise, v = noise − x0): for previews."""
    return x.to(torch.float32) - sigma.to(torch.float32) * velocity.to(torch.float32)


def start_noise(seed: int, channels: int, latent_h: int, latent_w: int, *, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The packed start latent for ``seed``: ``randn([1, C, H, W])`` from a CPU generator, then packed,
    exactly as FluxPipeline.prepare_latents with ``generator=torch.Generator('cpu').manual_seed(seed)``
    (the same noise on every device)."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn((1, channels, latent_h, latent_w), generator=generator, dtype=dtype).to(device)
    return pack_latents(noise)
