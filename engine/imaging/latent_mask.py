"""The pixel and latent sides of ``encode_vae_inpaint`` (spec §12.2 "Latents").

- The pixels the inpaint latent is encoded from: the crop with every masked pixel set to 0.5 grey,
  ``x·(1−w) + 0.5·w`` with ``w = round(mask/255)`` (so 128..255 count as masked).
- The latent mask: the pixel mask in [0, 1], bilinearly resized to 8× the latent size, rounded,
  8×8 max-pooled, rounded. A latent cell is masked when **any** pixel of its 8×8 block is (the golden
  ``latent_mask_12x16`` shows a block with 3 of 8 rows masked counting as masked).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["INPAINT_GREY", "LATENT_SCALE_PX", "grey_filled_pixels", "latent_mask"]

#: The value masked pixels take before the inpaint encode.
INPAINT_GREY = 0.5
#: Pixels per latent cell along each side (SDXL VAE).
LATENT_SCALE_PX = 8


def grey_filled_pixels(image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """H×W×3 ``uint8`` image and H×W ``uint8`` mask → ``[1, 3, H, W]`` float32 in [0, 1], hole = 0.5."""
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} sizes differ")
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32) / 255.0
    weight = torch.round(torch.from_numpy(np.ascontiguousarray(mask)).to(torch.float32) / 255.0)[:, :, None]
    filled = pixels * (1.0 - weight) + INPAINT_GREY * weight
    return filled.permute(2, 0, 1).unsqueeze(0).contiguous()


def latent_mask(mask: np.ndarray, latent_hw: tuple[int, int]) -> torch.Tensor:
    """H×W ``uint8`` pixel mask → ``[1, 1, h, w]`` float32 of 0/1 for a latent of ``latent_hw``."""
    latent_h, latent_w = latent_hw
    pixel = torch.from_numpy(np.ascontiguousarray(mask)).to(torch.float32)[None, None] / 255.0
    size = (latent_h * LATENT_SCALE_PX, latent_w * LATENT_SCALE_PX)
    if tuple(pixel.shape[2:]) != size:
        pixel = F.interpolate(pixel, size=size, mode="bilinear", align_corners=False)
    pooled = F.max_pool2d(torch.round(pixel), kernel_size=LATENT_SCALE_PX, stride=LATENT_SCALE_PX)
    return torch.round(pooled)
