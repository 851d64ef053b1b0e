"""Downscaled inline images that fit a byte budget.

Hosts cap tool output (Claude Code ~25k tokens, Claude Desktop 1 MiB; api_anchors §6.4) and some
feed base64 to the model as text, so a tool result carries small thumbnails only and links to the
full images. Each image gets an equal share of what is left of the budget; an image that cannot be
made to fit at the smallest size is left out rather than blowing the budget.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from engine.core.formats import MIME_BY_FORMAT, PIL_FORMAT

ThumbnailFormat = Literal["webp", "jpeg"]
MIN_SIDE_PX = 64
_QUALITIES = (80, 60, 40)


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    mime: str
    width: int
    height: int

    @property
    def b64_chars(self) -> int:
        return b64_len(len(self.data))


def b64_len(n_bytes: int) -> int:
    """Characters of the base64 form of ``n_bytes`` bytes (with padding)."""
    return 4 * math.ceil(n_bytes / 3)


def _encode(image: Image.Image, side_px: int, quality: int, fmt: ThumbnailFormat) -> Thumbnail:
    scale = min(1.0, side_px / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format=PIL_FORMAT[fmt], quality=quality)
    return Thumbnail(buf.getvalue(), MIME_BY_FORMAT[fmt], small.width, small.height)


def _sides(max_side_px: int) -> list[int]:
    """max_side_px, then ~30 % smaller each time, down to MIN_SIDE_PX."""
    sides, side = [], max_side_px
    while side > MIN_SIDE_PX:
        sides.append(side)
        side = int(side * 0.7)
    return sides + [MIN_SIDE_PX]


def thumbnail_fitting(image: Image.Image, *, max_side_px: int, max_b64_chars: int,
                      fmt: ThumbnailFormat = "webp") -> Thumbnail | None:
    """The largest, best-quality thumbnail of ``image`` whose base64 fits ``max_b64_chars``."""
    rgb = image.convert("RGB")
    for side in _sides(min(max_side_px, max(rgb.size))):
        for quality in _QUALITIES:
            thumb = _encode(rgb, side, quality, fmt)
            if thumb.b64_chars <= max_b64_chars:
                return thumb
    return None


def thumbnails_within_budget(images: Sequence[bytes], *, max_side_px: int, budget_b64_chars: int,
                             fmt: ThumbnailFormat = "webp") -> list[Thumbnail | None]:
    """One thumbnail (or None when it cannot fit) per encoded image; total base64 ≤ the budget."""
    out: list[Thumbnail | None] = []
    left = budget_b64_chars
    for i, data in enumerate(images):
        share = left // (len(images) - i)
        with Image.open(io.BytesIO(data)) as image:
            thumb = thumbnail_fitting(image, max_side_px=max_side_px, max_b64_chars=share, fmt=fmt)
        out.append(thumb)
        if thumb is not None:
            left -= thumb.b64_chars
    return out


def preview_thumbnail(rgb: np.ndarray, *, max_side_px: int = 256, max_b64_chars: int = 100_000) -> Thumbnail | None:
    """A small JPEG of an in-progress preview (uint8 RGB array)."""
    return thumbnail_fitting(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)), max_side_px=max_side_px,
                             max_b64_chars=max_b64_chars, fmt="jpeg")
