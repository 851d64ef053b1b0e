"""Pixel rules of Fooocus's mask generation (spec §12.6), numpy + OpenCV only.

``remove_small_regions`` follows segment-anything's ``utils/amg.py`` (which Fooocus's
``extras/sam`` uses through ``optimize_masks``, area threshold 400 px, holes first, then islands):
8-connected components of the working mask (the mask's complement for holes) below the area
threshold are flipped; when every island is small, the largest one is kept.
"""

from __future__ import annotations

import numpy as np

#: Fooocus optimize_masks: holes and islands under this many pixels are removed (spec §12.6).
SMALL_REGION_AREA_PX = 400


def remove_small_regions(mask: np.ndarray, area_px: int, mode: str) -> np.ndarray:
    """Bool H×W mask with small ``"holes"`` filled or small ``"islands"`` removed."""
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = (holes ^ mask.astype(bool)).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = [i + 1 for i, size in enumerate(sizes) if size < area_px]
    if not small:
        return mask.astype(bool)
    keep = [0, *small]
    if not holes:
        keep = [i for i in range(count) if i not in keep]
        if not keep:  # every island is small: keep the largest
            keep = [int(np.argmax(sizes)) + 1]
    return np.isin(labels, keep)


def optimize_mask(mask: np.ndarray, area_px: int = SMALL_REGION_AREA_PX) -> np.ndarray:
    """Small holes filled, then small islands removed (Fooocus optimize_masks, per SAM mask)."""
    return remove_small_regions(remove_small_regions(mask, area_px, "holes"), area_px, "islands")


def grow_boxes(boxes: np.ndarray, grow_px: int, width_px: int, height_px: int) -> np.ndarray:
    """Each xyxy box grown by ``grow_px`` on every side (negative shrinks), clipped to the image
    (Fooocus dino_erode_or_dilate)."""
    if grow_px == 0 or len(boxes) == 0:
        return boxes
    grown = boxes + np.array([-grow_px, -grow_px, grow_px, grow_px], dtype=boxes.dtype)
    grown[:, 0::2] = np.clip(grown[:, 0::2], 0, width_px)
    grown[:, 1::2] = np.clip(grown[:, 1::2], 0, height_px)
    return grown


def union_to_uint8(masks: list[np.ndarray], height_px: int, width_px: int) -> np.ndarray:
    """The union of bool masks as an H×W uint8 0/255 mask (all zero for none)."""
    out = np.zeros((height_px, width_px), dtype=bool)
    for mask in masks:
        out |= mask.astype(bool)
    return out.astype(np.uint8) * 255
