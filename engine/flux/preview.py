"""Cheap FLUX.1 previews: a 16×3 linear map from the model-space latent to RGB, no VAE.

The factors and bias are ComfyUI's published ones for FLUX.1 (``comfy/latent_formats.py``, class
``Flux``: ``latent_rgb_factors`` and ``latent_rgb_factors_bias``), numbers only. Rows are latent
channels 0..15, columns R, G, B; the result maps [-1, 1] to [0, 255] as the SDXL preview does.
"""

from __future__ import annotations

import numpy as np
import torch

FLUX_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS: tuple[float, float, float] = (-0.0329, -0.0718, -0.0851)


def flux_latent_to_rgb(latent: torch.Tensor) -> np.ndarray:
    """uint8 [h, w, 3] preview of the first image of a [B, 16, h, w] (or [16, h, w]) model-space latent,
    one pixel per latent cell; ``byte(clamp((rgb + 1) / 2, 0, 1) · 255)`` (truncating)."""
    x = latent[0] if latent.dim() == 4 else latent
    factors = torch.tensor(FLUX_LATENT_RGB_FACTORS, dtype=torch.float32)
    if x.shape[0] != factors.shape[0]:
        raise ValueError(f"a FLUX.1 latent has {factors.shape[0]} channels, got {x.shape[0]}")
    rgb = x.detach().float().cpu().permute(1, 2, 0) @ factors + torch.tensor(FLUX_LATENT_RGB_BIAS)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).to(torch.uint8).numpy()
