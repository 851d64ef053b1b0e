"""Inpaint mask preparation and outpaint padding (spec §12.2).

Masks are 2-D ``uint8`` arrays, 255 = repaint, 0 = keep. The morphology is OpenCV's (a 3×3 ones
kernel, OpenCV's default border), which is what Fooocus runs, so the results match its golden files
pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "MASK_THRESHOLD",
    "MORPH_OPEN_ROUNDS",
    "MORPH_OPEN_STEP",
    "OUTPAINT_DENOISE",
    "OUTPAINT_DIRECTIONS",
    "OUTPAINT_FRACTION",
    "OutpaintResult",
    "erode_or_dilate",
    "invert_mask",
    "merge_masks",
    "morphological_open",
    "needs_inpaint",
    "outpaint_pad",
]

#: spec §12.2: a mask pixel counts as "repaint" above this value.
MASK_THRESHOLD = 127
#: spec §12.2: outpaint adds int(0.3 · side) pixels per selected direction.
OUTPAINT_FRACTION = 0.3
#: spec §12.2: outpaint forces the denoise ("inpaint strength") to 1.0.
OUTPAINT_DENOISE = 1.0
#: Fooocus's direction names; top/bottom are applied before left/right whatever the order given.
OUTPAINT_DIRECTIONS = ("left", "right", "top", "bottom")
#: spec §12.2 morphological_open: 32 rounds of "dilate, minus 8" = a soft edge about 32 px wide.
MORPH_OPEN_ROUNDS = 32
MORPH_OPEN_STEP = 8

_KERNEL_3X3 = np.ones((3, 3), dtype=np.uint8)


def _binary(mask: np.ndarray) -> np.ndarray:
    return mask > MASK_THRESHOLD


def merge_masks(drawn: np.ndarray, uploaded: np.ndarray | None) -> np.ndarray:
    """The drawn mask max-merged with the uploaded one thresholded to 0/255 (spec §12.2 step 1).

    The drawn mask keeps its own values (it is thresholded later); the uploaded one is binarised
    first. Both must have the same H×W (the caller resizes an upload to the image).
    """
    if uploaded is None:
        return drawn.copy()
    if uploaded.shape != drawn.shape:
        raise ValueError(f"mask shapes differ: drawn {drawn.shape}, uploaded {uploaded.shape}")
    return np.maximum(drawn, _binary(uploaded).astype(np.uint8) * 255)


def erode_or_dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``k`` > 0: dilate ``k`` times, ``k`` < 0: erode ``|k|`` times, 3×3 ones kernel (spec §12.2 step 2)."""
    iterations = int(iterations)
    if iterations > 0:
        return cv2.dilate(mask, _KERNEL_3X3, iterations=iterations)
    if iterations < 0:
        return cv2.erode(mask, _KERNEL_3X3, iterations=-iterations)
    return mask.copy()


def invert_mask(mask: np.ndarray) -> np.ndarray:
    """``255 − mask`` (spec §12.2 step 3)."""
    return (255 - mask.astype(np.int16)).astype(np.uint8)


def needs_inpaint(mask: np.ndarray, outpaint_directions: Sequence[str] = ()) -> bool:
    """Inpainting runs only when some mask pixel is > 127 or an outpaint direction is set (step 4)."""
    return bool(outpaint_directions) or bool(_binary(mask).any())


def morphological_open(mask: np.ndarray) -> np.ndarray:
    """The soft blend mask ``color_correction`` uses (spec §12.2 post-processing step 2).

    Start from ``256·[mask > 127]`` in int16 (256, not 255, so the first round still leaves 248
    next to the mask), then 32 times ``x = max(x, dilate3×3(x) − 8)``; clip to 0..255.
    """
    x = _binary(mask).astype(np.int16) * 256
    for _ in range(MORPH_OPEN_ROUNDS):
        x = np.maximum(x, cv2.dilate(x, _KERNEL_3X3) - MORPH_OPEN_STEP)
    return np.clip(x, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class OutpaintResult:
    """The padded image and mask, and the denoise outpaint forces (spec §12.2 outpaint)."""

    image: np.ndarray
    mask: np.ndarray
    denoise: float = OUTPAINT_DENOISE


def outpaint_pad(image: np.ndarray, mask: np.ndarray, directions: Sequence[str]) -> OutpaintResult:
    """Pad ``image`` (edge replication) and ``mask`` (255) for each selected direction.

    Top/bottom add ``int(0.3·H)`` rows each and come first; left/right then add ``int(0.3·W)``
    columns each, so a corner is filled by replicating the already padded edge rows.
    The respective field Fooocus also assigns here arrives too late to matter (spec §12.2), so it is
    not part of the result: the caller keeps the method's respective field.
    """
    unknown = sorted(set(directions) - set(OUTPAINT_DIRECTIONS))
    if unknown:
        raise ValueError(f"unknown outpaint direction(s) {unknown}; expected {list(OUTPAINT_DIRECTIONS)}")
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} sizes differ")
    chosen = set(directions)
    out_image, out_mask = image, mask
    extra = ((0, 0),) * (image.ndim - 2)
    vertical = int(out_image.shape[0] * OUTPAINT_FRACTION)
    rows = (vertical if "top" in chosen else 0, vertical if "bottom" in chosen else 0)
    if any(rows):
        out_image = np.pad(out_image, (rows, (0, 0), *extra), mode="edge")
        out_mask = np.pad(out_mask, (rows, (0, 0)), mode="constant", constant_values=255)
    horizontal = int(out_image.shape[1] * OUTPAINT_FRACTION)
    cols = (horizontal if "left" in chosen else 0, horizontal if "right" in chosen else 0)
    if any(cols):
        out_image = np.pad(out_image, ((0, 0), cols, *extra), mode="edge")
        out_mask = np.pad(out_mask, ((0, 0), cols), mode="constant", constant_values=255)
    return OutpaintResult(image=out_image.copy(), mask=out_mask.copy())
