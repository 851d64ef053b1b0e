"""Image Prompt input preparation (spec §12.3): what each slot type does to its image before a model.

- ImagePrompt / FaceSwap (IP-Adapter): HWC3, then **stretch** to 224×224 (``resize_image`` mode 0,
  LANCZOS) for the CLIP vision encoder. (FaceSwap's face crop comes first:
  :func:`engine.imaging.face_crop.crop_face`.)
- PyraCanny / CPDS (Control-LoRA): HWC3, fit to the generation size with ``resize_image``'s default
  mode (scale to cover, keep the centre), then the preprocessor; the map goes back through HWC3.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from engine.imaging.convert import hwc3
from engine.imaging.preprocessors import canny_pyramid, cpds
from engine.imaging.resize import RESIZE_CROP, RESIZE_JUST, resize_image

__all__ = ["CONTROL_TYPES", "IP_ADAPTER_SIZE_PX", "control_map", "ip_adapter_input"]

#: spec §12.3: the CLIP ViT-H input side.
IP_ADAPTER_SIZE_PX = 224
ControlType = Literal["PyraCanny", "CPDS"]
CONTROL_TYPES: tuple[str, ...] = ("PyraCanny", "CPDS")


def ip_adapter_input(image: np.ndarray, *, loc: tuple[str | int, ...] = ()) -> np.ndarray:
    """The 224×224×3 ``uint8`` image the IP-Adapter's vision encoder sees (stretched, not cropped)."""
    return resize_image(hwc3(image, loc=loc), IP_ADAPTER_SIZE_PX, IP_ADAPTER_SIZE_PX, RESIZE_JUST)


def control_map(image: np.ndarray, control_type: ControlType, width_px: int, height_px: int, *,
                loc: tuple[str | int, ...] = ()) -> np.ndarray:
    """The ``height_px × width_px × 3`` control map of ``image`` for a PyraCanny or CPDS slot."""
    if control_type not in CONTROL_TYPES:
        raise ValueError(f"control_type must be one of {CONTROL_TYPES}, not {control_type!r}")
    fitted = resize_image(hwc3(image, loc=loc), width_px, height_px, RESIZE_CROP)
    edges = canny_pyramid(fitted) if control_type == "PyraCanny" else cpds(fitted)
    return hwc3(edges)
