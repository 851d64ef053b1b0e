"""The Image Prompt control-map preprocessors: PyraCanny and CPDS (spec §12.3).

Both take an RGB ``uint8`` H×W×3 image (already resize-fill-cropped to the generation size by the
caller) and return a 2-D ``uint8`` control map of the same H×W. They are written from the spec's
description and checked against Fooocus's own outputs in ``refdata/preprocessors/``
(``tests/golden/test_preprocessors.py``).

The float work is float32 throughout, in the order the spec gives, because the final ``uint8`` cast
truncates: a different precision or operation order moves pixels that sit on an integer boundary.
Inputs are never modified.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = [
    "CANNY_PYRAMID_SCALES",
    "CPDS_BLUR_SIGMA",
    "CPDS_PERCENTILES",
    "PYRACANNY_HIGH",
    "PYRACANNY_LOW",
    "PYRACANNY_PERCENTILES",
    "canny_pyramid",
    "cpds",
]

#: spec §12.3: the pyramid runs Canny at these fractions of the image size, smallest first.
CANNY_PYRAMID_SCALES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: spec §12.3: each finer level keeps 3/4 of the (upsampled) accumulator and adds 1/4 of its edges.
_PYRAMID_KEEP = 0.75
#: spec §12.3 table: Fooocus calls canny_pyramid(x, 64, 128) for PyraCanny.
PYRACANNY_LOW, PYRACANNY_HIGH = 64, 128
#: spec §12.3: the summed edge map is stretched so these percentiles map to 0 and 255.
PYRACANNY_PERCENTILES = (1.0, 99.0)
#: spec §12.3: CPDS blurs with this Gaussian sigma (kernel size derived from sigma) before decolor.
CPDS_BLUR_SIGMA = 0.8
#: spec §12.3: CPDS stretches its map so these percentiles map to 0 and 255.
CPDS_PERCENTILES = (4.0, 96.0)


def _check_rgb(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
        raise ValueError(f"expected an H×W×3 uint8 RGB image, got {got}")


def _stretch_to_uint8(values: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    """Map the ``low_pct``/``high_pct`` percentiles of a float32 map to 0/255, clip, truncate to uint8.

    In-place float32 steps (subtract, divide, then ×255) so each intermediate rounds as a float32
    array would; the percentiles themselves are numpy's linear-interpolation percentiles.
    """
    out = values.astype(np.float32, copy=True)
    lo = np.percentile(out, low_pct)
    hi = np.percentile(out, high_pct)
    out -= lo
    # A flat map (hi == lo) has no contrast to stretch; Fooocus would divide by zero and emit NaNs
    # (cast to 0). We return the all-zero map that cast gives, without the NaN warning.
    if hi == lo:
        return np.zeros(out.shape, dtype=np.uint8)
    out /= hi - lo
    return (out * 255.0).clip(0, 255).astype(np.uint8)


def _canny_rgb(image: np.ndarray, low: int, high: int) -> np.ndarray:
    """Canny on each RGB channel separately, as float32 0/1 maps stacked to H×W×3."""
    edges = [cv2.Canny(np.ascontiguousarray(image[..., c]), int(low), int(high)) for c in range(3)]
    return np.stack(edges, axis=2).astype(np.float32) / 255.0


def canny_pyramid(image: np.ndarray, low: int = PYRACANNY_LOW, high: int = PYRACANNY_HIGH) -> np.ndarray:
    """PyraCanny (spec §12.3): colour Canny over a pyramid of sizes, blended coarse to fine.

    The Control-LoRA canny model responds to edges at many scales, so edges found at every scale
    are blended in: each level is INTER_AREA-downscaled to ``int(H·k)×int(W·k)``, the accumulator is
    resized (bilinear) to that size and mixed 3:1 with the new edges. The three channels are then
    summed and stretched with the 1st/99th percentiles.
    """
    _check_rgb(image)
    height, width = image.shape[:2]
    acc: np.ndarray | None = None
    for k in CANNY_PYRAMID_SCALES:
        size_wh = (int(width * k), int(height * k))
        edges = _canny_rgb(cv2.resize(image, size_wh, interpolation=cv2.INTER_AREA), low, high)
        if acc is None:
            acc = edges
        else:
            acc = cv2.resize(acc, size_wh, interpolation=cv2.INTER_LINEAR)
            acc = acc * _PYRAMID_KEEP + edges * (1.0 - _PYRAMID_KEEP)
    assert acc is not None  # CANNY_PYRAMID_SCALES is not empty
    return _stretch_to_uint8(np.sum(acc, axis=2), *PYRACANNY_PERCENTILES)


def cpds(image: np.ndarray) -> np.ndarray:
    """CPDS (spec §12.3): contrast-preserving decolorization plus the colour-boost distance.

    ``cv2.decolor`` (Lu, Xu & Jia's contrast-preserving decolorization) returns a grey image and a
    colour-boosted image; the map is ``grey + ‖blurred − boost‖₂`` per pixel, stretched with the
    4th/96th percentiles. Like Fooocus, the RGB array goes to ``cv2.decolor`` as it is (OpenCV
    reads it as BGR); swapping channels here would change the map.
    """
    _check_rgb(image)
    blurred = cv2.GaussianBlur(image, (0, 0), CPDS_BLUR_SIGMA)
    grey, boost = cv2.decolor(blurred)
    diff = blurred.astype(np.float32) - boost.astype(np.float32)
    distance = np.sum(diff ** 2.0, axis=2) ** 0.5
    return _stretch_to_uint8(grey.astype(np.float32) + distance, *CPDS_PERCENTILES)
