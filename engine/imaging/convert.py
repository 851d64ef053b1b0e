"""Normalise decoded images and masks to what Fooocus's pixel code expects (spec §12).

Fooocus runs every input image through ``HWC3`` (a ControlNet utility): an ``H×W×3`` ``uint8``
array comes out whatever came in. Its rules, implemented in :func:`hwc3`:

- 2-D (greyscale) → a channel axis is added; 1 channel → repeated to 3;
- 3 channels → unchanged;
- 4 channels → composited over **white**: ``rgb·a + 255·(1−a)`` with ``a = alpha/255`` in float32,
  clipped and truncated to ``uint8``.

``HWC3`` only accepts ``uint8``. Our decoder (:func:`pil_to_rgb`) first brings every Pillow mode to
one of those layouts: palette images expand (keeping their transparency as alpha), CMYK/YCbCr/LAB/HSV
go through Pillow's own RGB conversion, 1-bit becomes 0/255, and 16-bit greyscale is scaled to 8 bit
with ``round(v / 257)``. The last is our choice: Fooocus's ``HWC3`` rejects 16-bit arrays, and
Pillow's plain ``convert`` clips 16-bit values at 255 (a nearly white picture).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from engine.core.errors import InvalidRequest

__all__ = ["hwc3", "mask_to_2d", "pil_to_rgb", "uint16_to_uint8"]

#: Pillow modes whose samples are 16-bit (or wider) integers holding 0..65535.
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
#: Colour spaces Pillow converts to RGB itself.
_PIL_TO_RGB_MODES = frozenset({"CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"})


def _invalid(message: str, loc: tuple[str | int, ...]) -> InvalidRequest:
    return InvalidRequest(message, loc=loc or None)


def uint16_to_uint8(values: np.ndarray) -> np.ndarray:
    """0..65535 → 0..255 by ``round(v / 257)`` (65535 = 255·257, so the ends map exactly)."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide + 128) // 257).astype(np.uint8)


def hwc3(image: np.ndarray, *, loc: tuple[str | int, ...] = ()) -> np.ndarray:
    """Fooocus's ``HWC3``: any ``uint8`` H×W, H×W×1, H×W×3 or H×W×4 array → H×W×3 ``uint8``.

    ``uint16`` arrays are scaled first (:func:`uint16_to_uint8`) and ``bool`` masks become 0/255;
    any other dtype or layout is an :class:`~engine.core.errors.InvalidRequest` at ``loc``.
    """
    array = np.asarray(image)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = uint16_to_uint8(array)
    elif array.dtype != np.uint8:
        raise _invalid(f"image pixels must be 8- or 16-bit integers, got {array.dtype}", loc)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise _invalid(f"image must be a non-empty H×W or H×W×C array, got shape {array.shape}", loc)
    channels = array.shape[2]
    if channels == 3:
        return array.copy()
    if channels == 1:
        return np.concatenate([array, array, array], axis=2)
    if channels == 4:
        color = array[:, :, 0:3].astype(np.float32)
        alpha = array[:, :, 3:4].astype(np.float32) / 255.0
        blended = color * alpha + 255.0 * (1.0 - alpha)
        return blended.clip(0, 255).astype(np.uint8)
    raise _invalid(f"image must have 1, 3 or 4 channels, got {channels}", loc)


def pil_to_rgb(image: Image.Image, *, loc: tuple[str | int, ...] = ()) -> np.ndarray:
    """A decoded Pillow image → H×W×3 ``uint8`` RGB, following :func:`hwc3` (module docstring)."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    elif mode == "LA":
        image = image.convert("RGBA")  # grey + alpha: composited over white like any RGBA
    elif mode in _PIL_TO_RGB_MODES:
        image = image.convert("RGB")
    elif mode in _WIDE_INT_MODES:
        return hwc3(uint16_to_uint8(np.asarray(image)), loc=loc)
    elif mode not in ("L", "RGB", "RGBA"):
        raise _invalid(f"unsupported image mode {mode!r}", loc)
    return hwc3(np.asarray(image), loc=loc)


def mask_to_2d(mask: np.ndarray, *, loc: tuple[str | int, ...] = ()) -> np.ndarray:
    """A mask image → 2-D ``uint8``: 2-D as is, else the first colour channel (spec §12.2 step 1).

    A 4-channel mask loses its alpha first, as Fooocus's upload widget converts to RGB before the
    mask is read, so transparent areas count by their stored colour (usually black = keep).
    """
    array = np.asarray(mask)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    return hwc3(array, loc=loc)[:, :, 0].copy()
