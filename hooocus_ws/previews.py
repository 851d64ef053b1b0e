"""Preview encoding: resize an RGB array to a connection's max side and encode it, once per size.

Many connections may watch the same job with the same settings; :class:`PreviewEncoder` caches
the encoded bytes by (job, job_seq, max_side, format, quality) so each size is encoded once.
Encoding runs in a worker thread (``anyio.to_thread``) so the event loop never does image work.
"""

from __future__ import annotations

import collections
import io
import threading
from typing import Any

import anyio.to_thread
import numpy as np
from PIL import Image

from engine.core.events import Preview
from engine.core.formats import MIME_BY_FORMAT, PIL_FORMAT
from hooocus_ws.protocol import PreviewSettings

#: Below this many pixels encoding is cheaper than a thread hop.
_INLINE_PIXELS = 64 * 64


def encode_preview(rgb: np.ndarray, settings: PreviewSettings) -> tuple[bytes, int, int, str]:
    """(bytes, width, height, mime) of ``rgb`` [H, W, 3] uint8, fitted inside ``settings.max_side``."""
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    if max(image.size) > settings.max_side:
        image.thumbnail((settings.max_side, settings.max_side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format=PIL_FORMAT[settings.format], quality=settings.quality)
    return buf.getvalue(), image.width, image.height, MIME_BY_FORMAT[settings.format]


class PreviewEncoder:
    """Thread-safe LRU of encoded previews shared by every connection of one app."""

    def __init__(self, *, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._cache: collections.OrderedDict[tuple[Any, ...], tuple[bytes, int, int, str]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.encoded = 0  # how many encodes actually ran (the rest were cache hits)

    def _key(self, preview: Preview, settings: PreviewSettings) -> tuple[Any, ...]:
        return (preview.job_id, preview.seq, settings.max_side, settings.format, settings.quality)

    def encode_sync(self, preview: Preview, settings: PreviewSettings) -> tuple[bytes, int, int, str]:
        key = self._key(preview, settings)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        assert preview.rgb is not None
        result = encode_preview(preview.rgb, settings)
        with self._lock:
            self.encoded += 1
            self._cache[key] = result
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return result

    async def encode(self, preview: Preview, settings: PreviewSettings) -> tuple[bytes, int, int, str]:
        assert preview.rgb is not None
        if preview.rgb.shape[0] * preview.rgb.shape[1] <= _INLINE_PIXELS:
            return self.encode_sync(preview, settings)
        return await anyio.to_thread.run_sync(self.encode_sync, preview, settings)
