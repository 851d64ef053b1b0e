"""LANCZOS resampling and the three ``resize_image`` modes (spec §12.1, §12.3).

Fooocus resamples with Pillow's LANCZOS filter everywhere (``resample_image``), and fits images to a
target size with ``resize_image`` (A1111's three modes, on numpy arrays):

- mode 0, *just resize*: stretch to ``width × height``;
- mode 1, *crop and resize*: scale to cover the target, keep the centre (the default);
- mode 2, *resize and fill*: scale to fit inside, centre it, fill the bands by stretching the
  resized image's edge row/column outward.

The golden data fix the output sizes only; the centring offset (``target // 2 − size // 2``) and the
cover/fit sizes (``w·H // h``, integer division) follow A1111's behaviour and are unit-tested.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["RESIZE_CROP", "RESIZE_FILL", "RESIZE_JUST", "resample_image", "resize_image"]

RESIZE_JUST = 0
RESIZE_CROP = 1
RESIZE_FILL = 2


def resample_image(image: np.ndarray, width_px: int, height_px: int) -> np.ndarray:
    """``image`` (H×W×C or H×W ``uint8``) resized to ``width_px × height_px`` with LANCZOS."""
    width_px, height_px = int(width_px), int(height_px)
    if width_px <= 0 or height_px <= 0:
        raise ValueError(f"target size must be positive, got {width_px}x{height_px}")
    if image.shape[1] == width_px and image.shape[0] == height_px:
        return image.copy()
    return np.asarray(Image.fromarray(image).resize((width_px, height_px), resample=Image.LANCZOS))


def resize_image(image: np.ndarray, width_px: int, height_px: int, resize_mode: int = RESIZE_CROP) -> np.ndarray:
    """Fit ``image`` to ``width_px × height_px`` by one of the three modes (module docstring)."""
    if resize_mode not in (RESIZE_JUST, RESIZE_CROP, RESIZE_FILL):
        raise ValueError(f"resize_mode must be 0, 1 or 2, got {resize_mode}")
    if resize_mode == RESIZE_JUST:
        return resample_image(image, width_px, height_px)
    src_h, src_w = image.shape[:2]
    ratio = width_px / height_px
    src_ratio = src_w / src_h
    # Crop scales so the image covers the target; fill scales so it fits inside.
    width_is_bound = ratio > src_ratio if resize_mode == RESIZE_CROP else ratio < src_ratio
    scaled_w = width_px if width_is_bound else src_w * height_px // src_h
    scaled_h = height_px if not width_is_bound else src_h * width_px // src_w
    scaled = resample_image(image, max(1, scaled_w), max(1, scaled_h))
    scaled_h, scaled_w = scaled.shape[:2]
    top = height_px // 2 - scaled_h // 2
    left = width_px // 2 - scaled_w // 2
    if resize_mode == RESIZE_CROP:
        return scaled[-top:-top + height_px, -left:-left + width_px].copy()
    out = np.zeros((height_px, width_px, *image.shape[2:]), dtype=image.dtype)
    out[top:top + scaled_h, left:left + scaled_w] = scaled
    if ratio < src_ratio:  # bands above and below
        out[:top] = scaled[:1]
        out[top + scaled_h:] = scaled[-1:]
    elif ratio > src_ratio:  # bands left and right
        out[:, :left] = scaled[:, :1]
        out[:, left + scaled_w:] = scaled[:, -1:]
    return out
