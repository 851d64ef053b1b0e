"""Connection-level guards uvicorn does not have: a header-read timeout and a per-address cap.

uvicorn (0.55, h11) keeps a connection that never finishes its request headers open forever
(``timeout_keep_alive`` only runs *between* requests, ``h11_max_incomplete_event_size`` bounds
bytes, not time), so a few hundred stalled sockets exhaust the process's file descriptors and
``/healthz`` stops answering. We subclass uvicorn's own protocol classes (``uvicorn.Config``
accepts classes for ``http=`` and ``ws=``) rather than wrapping sockets, so everything else —
parsing, keep-alive, websocket upgrade, graceful shutdown — stays uvicorn's:

- **Header timeout**: the request headers must be complete within ``header_timeout_s`` of the
  connection opening (or of the previous response on a keep-alive connection); otherwise the
  connection is closed. Once the headers are in, slow handlers (a waiting ``POST /v1/generate``)
  and websockets are unaffected.
- **Per-address cap**: at most ``max_per_address`` open connections (HTTP and websocket alike) from
  one peer address; one more is answered ``503`` and closed at once. Peers listed in
  ``trusted_proxies`` are exempt: behind a proxy every client shares its address.

A websocket upgrade hands the transport to the websocket protocol object, so both subclasses
release the slot when their connection is lost (releasing twice is harmless).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from hooocus_ws.auth import Network, in_networks

log = logging.getLogger("hooocus.ws.connections")

_REFUSED_BODY = b'{"error":{"code":"rate_limited","message":"too many open connections from this address"}}'
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY)

class ConnectionTracker:
    """Open connections per peer address (event-loop thread only). Bounded: one entry per open
    connection, so its size is at most the number of open file descriptors."""

    def __init__(self, max_per_address: int, exempt: Sequence[Network] = ()) -> None:
        self.max_per_address = max_per_address
        self.exempt = tuple(exempt)
        self._address_of: dict[Any, str] = {}
        self._counts: collections.Counter[str] = collections.Counter()

    def open(self, transport: Any, address: str | None) -> bool:
        """Count ``transport``; False (and not counted) when ``address`` is at its cap."""
        key = address or "unknown"
        if self._counts[key] >= self.max_per_address and not in_networks(key, self.exempt):
            return False
        self._address_of[transport] = key
        self._counts[key] += 1
        return True

    def close(self, transport: Any) -> None:
        key = self._address_of.pop(transport, None)
        if key is None:
            return
        self._counts[key] -= 1
        if self._counts[key] <= 0:
            del self._counts[key]

    def count(self, address: str) -> int:
        return self._counts.get(address, 0)


def protocol_classes(tracker: ConnectionTracker, *, header_timeout_s: float) -> tuple[type[Any], type[Any]]:
    """``(http, ws)`` protocol classes for ``uvicorn.Config`` bound to ``tracker``."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if not tracker.open(transport, self.client[0] if self.client else None):
                log.warning("refused a connection from %s: %d already open (max_connections_per_address)",
                            self.client[0] if self.client else "unknown", tracker.max_per_address)
                transport.write(_REFUSED)
                transport.close()
                return
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _header_timeout(self) -> None:
            self._header_timer = None
            # IDLE: h11 has not seen a complete request line + headers since the timer was armed.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closed a connection from %s: no complete request headers within %.0f s",
                         self.client[0] if self.client else "unknown", header_timeout_s)
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()  # the next request on this keep-alive connection

        def handle_websocket_upgrade(self, event: h11.Request) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            tracker.close(self.transport)
            super().connection_lost(exc)

    class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
        def connection_lost(self, exc: Exception | None) -> None:
            tracker.close(self.transport)
            super().connection_lost(exc)

    return GuardedH11Protocol, GuardedWebSocketProtocol
