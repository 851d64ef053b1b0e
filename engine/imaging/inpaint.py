"""Inpaint pixel work: the crop box, the colour prior, paste-back and colour correction (spec §12.2).

The "interested area" is a box ``[a, b) × [c, d)`` (rows a..b, columns c..d) around the mask,
grown toward the inpaint *respective field* ``k``. Generation happens on that crop only; the result
is resized back, pasted, and blended into the original with a soft mask.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from engine.imaging.masks import MASK_THRESHOLD
from engine.imaging.resize import resample_image

__all__ = [
    "FILL_BLUR_SCHEDULE",
    "INITIAL_BOX_SCALE",
    "Box",
    "color_correction",
    "compute_initial_abcd",
    "crop_mask_for_generation",
    "fooocus_fill",
    "paste_back",
    "solve_abcd",
]

#: (a, b, c, d): rows [a, b), columns [c, d).
Box = tuple[int, int, int, int]

#: spec §12.2 step 5: (box-blur radius, repeats), coarse to fine.
FILL_BLUR_SCHEDULE: tuple[tuple[int, int], ...] = (
    (512, 2), (256, 2), (128, 4), (64, 4), (33, 8), (15, 8), (5, 16), (3, 16),
)
#: spec §12.2 crop step 1: the square's half-size is the mask's larger half-extent times this.
INITIAL_BOX_SCALE = 1.15


def fooocus_fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A smooth colour prior in the hole (spec §12.2 step 5): H×W×3 ``uint8`` in and out.

    Box blurs of shrinking radius (Pillow's ``BoxBlur``, which is what matches the golden file bit
    for bit) run over the whole image; after each one the pixels outside the mask (≤ 127) are put
    back, so colour seeps into the hole from its border. The hole starts with its own pixels.
    """
    keep = ~(mask > MASK_THRESHOLD)
    current = image.copy()
    for radius, repeats in FILL_BLUR_SCHEDULE:
        blur = ImageFilter.BoxBlur(radius)
        for _ in range(repeats):
            current = np.array(Image.fromarray(current).filter(blur))
            current[keep] = image[keep]
    return current


def compute_initial_abcd(mask: np.ndarray) -> Box:
    """The square box around the mask's bounding box (spec §12.2 crop step 1).

    From the inclusive bounding box ``[a, b] × [c, d]`` of the pixels > 0: centres ``(a+b)//2``,
    ``(c+d)//2``, half-extents ``(b−a)//2``, ``(d−c)//2``; half-size ``l = int(max(half-extents)·1.15)``;
    box ``[centre − l, centre + l + 1)`` per axis, clipped to the image. An empty mask gives the
    whole image (Fooocus never gets there: it skips inpainting without a mask, spec §12.2 step 4).
    """
    height, width = mask.shape[:2]
    rows, cols = np.nonzero(mask > 0)
    if rows.size == 0:
        return 0, height, 0, width
    a, b = int(rows.min()), int(rows.max())
    c, d = int(cols.min()), int(cols.max())
    row_centre, row_half = (a + b) // 2, (b - a) // 2
    col_centre, col_half = (c + d) // 2, (d - c) // 2
    half = int(max(row_half, col_half) * INITIAL_BOX_SCALE)
    return (max(0, row_centre - half), min(height, row_centre + half + 1),
            max(0, col_centre - half), min(width, col_centre + half + 1))


def solve_abcd(height_px: int, width_px: int, box: Box, k: float) -> Box:
    """Grow ``box`` until it is at least ``k·H`` tall and ``k·W`` wide (spec §12.2 crop step 2).

    Each round widens the currently *shorter* side (the width on a tie) by one pixel at each end,
    clipped at the image border, so a box at an edge grows one pixel per round. A side already as
    long as the image stops growing. ``k = 1`` gives the whole image.
    """
    if not 0.0 <= k <= 1.0:
        raise ValueError(f"respective field must be in [0, 1], got {k}")
    a, b, c, d = box
    need_h, need_w = height_px * k, width_px * k
    while True:
        h, w = b - a, d - c
        if h >= need_h and w >= need_w:
            return a, b, c, d
        grow_rows = h < w
        if grow_rows and h >= height_px:
            grow_rows = False
        elif not grow_rows and w >= width_px:
            grow_rows = True
        if grow_rows:
            a, b = max(0, a - 1), min(height_px, b + 1)
        else:
            c, d = max(0, c - 1), min(width_px, d + 1)


def crop_mask_for_generation(mask_crop: np.ndarray, height_px: int, width_px: int) -> np.ndarray:
    """The cropped mask at the generation size: LANCZOS-resized, then > 127 → 255 else 0 (step 4)."""
    resized = resample_image(mask_crop, width_px, height_px)
    return ((resized > MASK_THRESHOLD).astype(np.uint8)) * 255


def paste_back(image: np.ndarray, generated_crop: np.ndarray, box: Box) -> np.ndarray:
    """``image`` with ``generated_crop`` resized (LANCZOS) to the box and pasted into it (post step 1)."""
    a, b, c, d = box
    out = image.copy()
    out[a:b, c:d] = resample_image(generated_crop, d - c, b - a)
    return out


def color_correction(original: np.ndarray, pasted: np.ndarray, soft_mask: np.ndarray) -> np.ndarray:
    """``pasted·w + original·(1−w)`` with ``w = soft_mask/255`` in float32, truncated to ``uint8``.

    ``soft_mask`` is :func:`~engine.imaging.masks.morphological_open` of the full-image mask
    (spec §12.2 post step 2); float32 and truncation are what reproduce the golden file exactly.
    """
    weight = soft_mask.astype(np.float32)[:, :, None] / 255.0
    blended = pasted.astype(np.float32) * weight + original.astype(np.float32) * (1.0 - weight)
    return blended.clip(0, 255).astype(np.uint8)
