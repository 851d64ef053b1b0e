"""Image sizes for Vary and Upscale, and the VAE-encode crop (spec §12.1).

Fooocus sizes every image-input generation from the *shape ceil*, the side of the square with the
image's area rounded up to a multiple of 64. The rules below are checked case by case against
``refdata/image_ops/image_ops.json`` (``shape_ceil_and_uov_sizes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "UPSCALE_DENOISE",
    "UPSCALE_DIRECT_RETURN_ABOVE_PX",
    "UPSCALE_MIN_SHAPE_CEIL_PX",
    "VARY_MAX_SHAPE_CEIL_PX",
    "VARY_MIN_SHAPE_CEIL_PX",
    "VARY_STRONG_DENOISE",
    "VARY_SUBTLE_DENOISE",
    "UpscalePlan",
    "get_shape_ceil",
    "set_image_shape_ceil_hw",
    "upscale_plan",
    "vae_encode_crop_box",
    "vary_target_hw",
]

#: spec §12.1: the default denoise of Vary (Subtle) / Vary (Strong) / Upscale 1.5x and 2x.
VARY_SUBTLE_DENOISE = 0.5
VARY_STRONG_DENOISE = 0.85
UPSCALE_DENOISE = 0.382
#: spec §12.1: Vary clamps the shape ceil into [1024, 2048] before sampling.
VARY_MIN_SHAPE_CEIL_PX = 1024
VARY_MAX_SHAPE_CEIL_PX = 2048
#: spec §12.1: an upscale target whose shape ceil is below this is resized to this shape ceil instead.
UPSCALE_MIN_SHAPE_CEIL_PX = 1024
#: spec §12.1: above this shape ceil the upscaled pixels are returned without diffusion.
UPSCALE_DIRECT_RETURN_ABOVE_PX = 2800
#: set_image_shape_ceil gives up after this many refinements (spec §12.1; it converges in 1–3).
_SHAPE_CEIL_MAX_ROUNDS = 256
#: ... and stops when the ceil is this close to the target (the values are multiples of 64, so it
#: means "equal"; the tolerance is Fooocus's float comparison).
_SHAPE_CEIL_TOLERANCE = 0.1


def get_shape_ceil(height_px: float, width_px: float) -> float:
    """``ceil(sqrt(h·w) / 64) · 64`` (spec §12.1). Floats in, float out, as Fooocus computes it."""
    return math.ceil(math.sqrt(height_px * width_px) / 64.0) * 64.0


def set_image_shape_ceil_hw(height_px: int, width_px: int, shape_ceil_px: float) -> tuple[int, int]:
    """The (H, W) ``set_image_shape_ceil`` resizes an image of ``height_px × width_px`` to (spec §12.1).

    Each round rescales the *current* H and W by ``target / get_shape_ceil(H, W)`` and rounds each to
    a multiple of 64 (Python ``round``: ties to even). The result keeps the aspect ratio only roughly.
    """
    if height_px <= 0 or width_px <= 0:
        raise ValueError(f"image size must be positive, got {height_px}x{width_px}")
    h, w = int(height_px), int(width_px)
    for _ in range(_SHAPE_CEIL_MAX_ROUNDS):
        current = get_shape_ceil(h, w)
        if abs(current - shape_ceil_px) < _SHAPE_CEIL_TOLERANCE:
            break
        k = shape_ceil_px / current
        h = int(round(h * k / 64.0) * 64)
        w = int(round(w * k / 64.0) * 64)
    return h, w


def vary_target_hw(height_px: int, width_px: int) -> tuple[int, int]:
    """The size Vary samples at: the shape ceil clamped into [1024, 2048] (spec §12.1 step 1).

    An image whose shape ceil is already inside the range keeps its exact size (not a multiple of
    64; the VAE crop then trims it to multiples of 8).
    """
    ceil = get_shape_ceil(height_px, width_px)
    if ceil < VARY_MIN_SHAPE_CEIL_PX:
        return set_image_shape_ceil_hw(height_px, width_px, VARY_MIN_SHAPE_CEIL_PX)
    if ceil > VARY_MAX_SHAPE_CEIL_PX:
        return set_image_shape_ceil_hw(height_px, width_px, VARY_MAX_SHAPE_CEIL_PX)
    return int(height_px), int(width_px)


@dataclass(frozen=True)
class UpscalePlan:
    """What Upscale 1.5x / 2x does with an image (spec §12.1 steps 2–3).

    ``rule`` says how the 4× super-resolved pixels become ``result_hw``: ``"shape_ceil"`` =
    ``set_image_shape_ceil(upscaled, 1024)``, ``"resample"`` = LANCZOS to ``(W·f, H·f)``.
    ``direct_return``: the resized pixels are the answer, no diffusion (shape ceil > 2800).
    """

    factor: float
    shape_ceil_px: float
    rule: Literal["shape_ceil", "resample"]
    result_hw: tuple[int, int]
    direct_return: bool


def upscale_plan(height_px: int, width_px: int, factor: float, *, sr_scale: int = 4) -> UpscalePlan:
    """The target size and path of Upscale by ``factor`` for an input of ``height_px × width_px``.

    The shape ceil is taken of the *input* size times ``factor``; the small-target rule runs
    ``set_image_shape_ceil`` on the super-resolved image (``sr_scale`` × the input, 4 for Fooocus's
    ESRGAN), as Fooocus does. A fractional ``W·f`` is truncated to an integer pixel count.
    """
    if factor <= 0:
        raise ValueError(f"upscale factor must be positive, got {factor}")
    shape_ceil = get_shape_ceil(height_px * factor, width_px * factor)
    if shape_ceil < UPSCALE_MIN_SHAPE_CEIL_PX:
        rule: Literal["shape_ceil", "resample"] = "shape_ceil"
        result = set_image_shape_ceil_hw(height_px * sr_scale, width_px * sr_scale, UPSCALE_MIN_SHAPE_CEIL_PX)
    else:
        rule = "resample"
        result = (int(height_px * factor), int(width_px * factor))
    return UpscalePlan(factor=factor, shape_ceil_px=shape_ceil, rule=rule, result_hw=result,
                       direct_return=shape_ceil > UPSCALE_DIRECT_RETURN_ABOVE_PX)


def vae_encode_crop_box(height_px: int, width_px: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the pixels a VAE encode keeps (spec §12.1, image_ops.json).

    The encoder needs multiples of 8: each side is cut to ``(dim // 8) · 8``, centred with offset
    ``(dim % 8) // 2``. The latent is then ``(H // 8, W // 8)``.
    """
    top = (height_px % 8) // 2
    left = (width_px % 8) // 2
    return top, top + (height_px // 8) * 8, left, left + (width_px // 8) * 8
