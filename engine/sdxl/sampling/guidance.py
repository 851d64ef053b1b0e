"""Classifier-free guidance with Fooocus's two tricks: sharpness and CFG mimicking (spec §5, §6).

Both work on ``eps = x − x0`` (σ·ε), not on ε; for a linear blend that is the same thing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from engine.sdxl.sampling.anisotropic import adaptive_anisotropic_filter

#: spec §5: alpha = SHARPNESS_SCALE · sharpness · progress.
SHARPNESS_SCALE = 0.001
#: The last discrete UNet timestep; progress = 1 − t/999.
LAST_TIMESTEP = 999.0


def progress_from_timestep(timestep: Tensor | float) -> float:
    """Diffusion progress ``p = 1 − t/999`` computed in float32 as Fooocus does (0 noisy → 1 clean)."""
    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[0]
    return float(1.0 - t / LAST_TIMESTEP)


def compute_cfg(uncond: Tensor, cond: Tensor, cfg_scale: float, adaptive_cfg: float, progress: float) -> Tensor:
    """CFG with "mimicking from TSNR" (spec §6).

    Above ``adaptive_cfg`` (strictly), blend the real CFG with CFG at ``adaptive_cfg`` by
    progress: early (noisy) steps behave like CFG = ``adaptive_cfg``, late steps like the real one.
    """
    real = uncond + float(cfg_scale) * (cond - uncond)
    if cfg_scale > adaptive_cfg:
        mimicked = uncond + float(adaptive_cfg) * (cond - uncond)
        return real * progress + mimicked * (1 - progress)
    return real


def sharpness_sampling_function(
    x: Tensor, x0_pos: Tensor, x0_neg: Tensor | None, *, cfg: float, sharpness: float, adaptive_cfg: float,
    timestep: Tensor | float,
) -> Tensor:
    """Fooocus's guided denoised ``x0`` from the positive and negative predictions (spec §5 + §6).

    ``timestep`` is the discrete UNet timestep of this call. With ``cfg ≈ 1`` only the positive
    prediction counts (no sharpness, no mimicking; ``x0_neg`` may be None).
    """
    if math.isclose(cfg, 1.0):
        return x0_pos
    if x0_neg is None:
        raise ValueError("x0_neg is required when cfg != 1")
    progress = progress_from_timestep(timestep)
    eps_pos = x - x0_pos
    eps_neg = x - x0_neg
    alpha = SHARPNESS_SCALE * sharpness * progress
    if alpha != 0.0:
        # Mix in the edge-preserving blur of the positive eps, guided by the positive x0.
        eps_pos_degraded = adaptive_anisotropic_filter(eps_pos, g=x0_pos)
        eps_pos = eps_pos_degraded * alpha + eps_pos * (1.0 - alpha)
    eps = compute_cfg(eps_neg, eps_pos, cfg, adaptive_cfg, progress)
    return x - eps
