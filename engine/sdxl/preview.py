"""Cheap latent previews: the Latent2RGB linear map (spec §16), no weights needed.

Fooocus's own UI runs the VAEApprox CNN (lllyasviel's weights, spec §16); we use the ComfyUI-style
linear fallback the spec documents, which needs only a 4×3 matrix per latent format.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

#: Rows = latent channels 0..3, columns = R, G, B (spec §16; refdata/latent_preview/latent_formats.json).
_SDXL_FACTORS = ((0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653),
                 (0.0568, 0.1687, -0.0755), (-0.3112, -0.2359, -0.2076))
LATENT_RGB_FACTORS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sdxl": _SDXL_FACTORS,
    "sd15": ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
             (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
    # Playground 2.5 reuses the SDXL factors (its mean/std only matter for the VAE, not the preview).
    "sdxl_playground_2_5": _SDXL_FACTORS,
    "sd_x4": ((-0.2340, -0.3863, -0.3257), (0.0994, 0.0885, -0.0908),
              (-0.2833, -0.2349, -0.3741), (0.2523, -0.0055, -0.1651)),
}
_ALIASES = {"playground": "sdxl_playground_2_5", "sd1.5": "sd15", "sd1": "sd15"}


def latent_rgb_factors(latent_format: str) -> torch.Tensor:
    """The [4, 3] float32 factor matrix of a latent format ('sdxl', 'sd15', 'playground', 'sd_x4')."""
    key = latent_format.lower()
    key = _ALIASES.get(key, key)
    if key not in LATENT_RGB_FACTORS:
        raise ValueError(f"unknown latent format {latent_format!r}; known: {sorted(LATENT_RGB_FACTORS)}")
    return torch.tensor(LATENT_RGB_FACTORS[key], dtype=torch.float32)


def latent_to_rgb(x0: torch.Tensor, *, latent_format: str = "sdxl") -> np.ndarray:
    """Latent2RGB preview of the first image: uint8 [h, w, 3], one pixel per latent cell (spec §16).

    ``x0``: [B, 4, h, w] or [4, h, w] model-space latent (the step's denoised prediction).
    ``byte(clamp((rgb + 1) / 2, 0, 1) · 255)`` truncates, as the reference does.
    """
    latent = x0[0] if x0.dim() == 4 else x0
    rgb = latent.detach().float().cpu().permute(1, 2, 0) @ latent_rgb_factors(latent_format)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).to(torch.uint8).numpy()


def resize_preview(rgb: np.ndarray, max_side_px: int) -> np.ndarray:
    """Shrink an RGB uint8 image so its longer side is at most ``max_side_px``, keeping the aspect ratio.

    Never scales up (a latent preview carries no more detail than its latent cells); bilinear
    filtering on the way down; every side keeps at least one pixel.
    """
    if max_side_px < 1:
        raise ValueError(f"max_side_px must be >= 1, got {max_side_px}")
    height, width = rgb.shape[:2]
    longest = max(height, width)
    if longest <= max_side_px:
        return rgb
    scale = max_side_px / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
