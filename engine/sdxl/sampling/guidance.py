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


Scalar = float | Tensor


def progress_tensor(timestep: Tensor | float) -> Tensor:
    """Diffusion progress ``p = 1 − t/999`` as a float32 0-d tensor on the timestep's device, as
    Fooocus computes it (0 noisy → 1 clean); no host sync."""
    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[0]
    return 1.0 - t / LAST_TIMESTEP


def progress_from_timestep(timestep: Tensor | float) -> float:
    """:func:`progress_tensor` as a Python float (the eager path branches on it)."""
    return float(progress_tensor(timestep))


def compute_cfg(uncond: Tensor, cond: Tensor, cfg_scale: Scalar, adaptive_cfg: Scalar, progress: Scalar) -> Tensor:
    """CFG with "mimicking from TSNR" (spec §6).

    Above ``adaptive_cfg`` (strictly), blend the real CFG with CFG at ``adaptive_cfg`` by
    progress: early (noisy) steps behave like CFG = ``adaptive_cfg``, late steps like the real one.
    Scalars are Python numbers (eager: the branch skips the unused blend) or 0-d tensors (the
    compiled path: ``torch.where`` instead of a Python branch on data, so no host sync).
    """
    if not isinstance(cfg_scale, Tensor):
        cfg_scale, adaptive_cfg = float(cfg_scale), float(adaptive_cfg)
    real = uncond + cfg_scale * (cond - uncond)
    if isinstance(cfg_scale, Tensor):
        mimicked = uncond + adaptive_cfg * (cond - uncond)
        return torch.where(cfg_scale > adaptive_cfg, real * progress + mimicked * (1 - progress), real)
    if cfg_scale > adaptive_cfg:
        mimicked = uncond + adaptive_cfg * (cond - uncond)
        return real * progress + mimicked * (1 - progress)
    return real


def guided_x0(x: Tensor, x0_pos: Tensor, x0_neg: Tensor, *, progress: Scalar, cfg: Scalar, adaptive_cfg: Scalar,
              sharpness: Scalar) -> Tensor:
    """Sharpness (spec §5) then mimicked CFG (spec §6) on ``eps = x − x0``: the one implementation
    behind both the eager reference and the compiled graph (engine/sdxl/acceleration/guidance.py).

    With Python-number scalars a zero ``alpha`` skips the filter; with tensor scalars every op runs
    (a zero alpha then blends exactly to the unfiltered eps), so one graph serves all steps.
    """
    eps_pos = x - x0_pos
    eps_neg = x - x0_neg
    alpha = SHARPNESS_SCALE * sharpness * progress
    if isinstance(alpha, Tensor) or alpha != 0.0:
        # Mix in the edge-preserving blur of the positive eps, guided by the positive x0.
        eps_pos_degraded = adaptive_anisotropic_filter(eps_pos, g=x0_pos)
        eps_pos = eps_pos_degraded * alpha + eps_pos * (1.0 - alpha)
    eps = compute_cfg(eps_neg, eps_pos, cfg, adaptive_cfg, progress)
    return x - eps


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
    return guided_x0(x, x0_pos, x0_neg, progress=progress_from_timestep(timestep), cfg=cfg,
                     adaptive_cfg=adaptive_cfg, sharpness=sharpness)


def guidance_tensors(x: Tensor, x0_pos: Tensor, x0_neg: Tensor, timestep: Tensor, cfg: Tensor, adaptive_cfg: Tensor,
                     sharpness: Tensor) -> Tensor:
    """:func:`guided_x0` with every scalar a tensor: no host sync, no Python branch on data, so it
    compiles to one graph for all steps and jobs. Callers skip it when cfg ≈ 1 (spec §6: positive
    branch only), exactly as :func:`sharpness_sampling_function` does."""
    return guided_x0(x, x0_pos, x0_neg, progress=progress_tensor(timestep), cfg=cfg, adaptive_cfg=adaptive_cfg,
                     sharpness=sharpness)
