"""Fooocus's "sharpness" filter: a joint bilateral blur of the positive eps (spec §5).

Our own vectorised implementation of the math in spec §5 (13×13 window, σ_space 3, σ_color 3,
reflect padding 6, L1 colour distance over channels, guidance standardised per batch item). The
window is gathered with one ``unfold``, so the whole filter is a handful of batched tensor ops
(GPU- and ``torch.compile``-friendly, no Python loop over pixels or offsets). The window sits in
the last dimension, as in kornia's bilateral filter (Apache-2.0), which Fooocus's filter derives
from: the float32 sums then run in the same order and match refdata/sharpness bit for bit.
Memory: two ``[B, C, H, W, 169]`` float32 temporaries (≈ 45 MB each for one 128×128 latent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KERNEL_SIZE = 13
SIGMA_SPACE = 3.0
SIGMA_COLOR = 3.0
#: Added to the guidance std before dividing (spec §5 step 1).
GUIDANCE_STD_EPS = 1e-5


def gaussian_kernel2d(kernel_size: int = KERNEL_SIZE, sigma: float = SIGMA_SPACE, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Tensor:
    """Normalised separable Gaussian on offsets −k//2..k//2, as a ``[k, k]`` outer product."""
    offsets = torch.arange(kernel_size, dtype=dtype, device=device) - kernel_size // 2
    gauss = torch.exp(-offsets**2 / (2.0 * sigma**2))
    gauss = gauss / gauss.sum()
    return gauss[:, None] * gauss[None, :]


def _windows(x: Tensor, kernel_size: int) -> Tensor:
    """Reflect-pad and gather every ``k×k`` window: ``[B, C, H, W]`` → ``[B, C, H, W, k·k]``."""
    pad = kernel_size // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return padded.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1).flatten(-2)


def bilateral_blur(x: Tensor, guidance: Tensor, kernel_size: int = KERNEL_SIZE, sigma_color: float = SIGMA_COLOR,
                   sigma_space: float = SIGMA_SPACE) -> Tensor:
    """Joint bilateral blur of ``x`` guided by ``guidance`` (same shape ``[B, C, H, W]``, H, W > k//2).

    Weight of a neighbour = spatial Gaussian × ``exp(−0.5/σ_c² · (Σ_c |g_nb − g_center|)²)``; the
    weights are shared by all channels and normalised per pixel.
    """
    space = gaussian_kernel2d(kernel_size, sigma_space, dtype=x.dtype, device=x.device).reshape(1, 1, 1, 1, -1)
    g_windows = _windows(guidance, kernel_size)  # [B, C, H, W, k²]
    color_distance = (g_windows - guidance.unsqueeze(-1)).abs().sum(dim=1, keepdim=True)  # [B, 1, H, W, k²]
    weights = space * torch.exp(-0.5 / sigma_color**2 * color_distance.square())
    return (_windows(x, kernel_size) * weights).sum(dim=-1) / weights.sum(dim=-1)


def adaptive_anisotropic_filter(x: Tensor, g: Tensor | None = None) -> Tensor:
    """Blur ``x`` along edges of ``g`` (default ``x``), ``g`` standardised per batch item (spec §5).

    Standardisation uses the unbiased std over (C, H, W), as ``torch.std_mean`` does by default.
    """
    if g is None:
        g = x
    std, mean = torch.std_mean(g, dim=(1, 2, 3), keepdim=True)
    guidance = (g - mean) / (std + GUIDANCE_STD_EPS)
    return bilateral_blur(x, guidance)
