"""Signed, expiring image URLs: ``/v1/images/{sha256}.{ext}?exp=UNIX_S&sig=HMAC``.

``<img>`` tags and MCP clients cannot send an Authorization header; a short-lived signature over
the path and expiry lets them fetch one image without ever seeing a token (api_anchors §9 #7).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable


class UrlSigner:
    def __init__(self, key: bytes | str | None = None, *, clock: Callable[[], float] = time.time) -> None:
        if key is None:
            key = secrets.token_bytes(32)  # per process: URLs die with the server, which is fine
        self._key = key.encode("utf-8") if isinstance(key, str) else key
        self._clock = clock

    def _sig(self, path: str, exp: int) -> str:
        mac = hmac.new(self._key, f"{path}\n{exp}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:18]).decode("ascii")

    def sign(self, path: str, *, ttl_s: float) -> str:
        exp = int(self._clock() + ttl_s)
        return f"{path}?exp={exp}&sig={self._sig(path, exp)}"

    def verify(self, path: str, exp: str | None, sig: str | None) -> bool:
        if not exp or not sig or not exp.isdigit() or len(exp) > 12:
            return False
        if int(exp) < self._clock():
            return False
        return hmac.compare_digest(self._sig(path, int(exp)), sig)
