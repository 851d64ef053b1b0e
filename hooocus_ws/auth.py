"""The auth gate shared by the websocket handshake and the HTTP routes (house style B2).

- A token travels in ``Authorization: Bearer TOKEN`` or, for browsers, as the subprotocol
  ``hooocus.token.TOKEN`` next to ``hooocus.v1`` (never echoed back). A token in the query string
  is refused outright: URLs end up in logs.
- Tokens are checked by :class:`TokenStore` (SHA-256 digests, constant-time compare).
- Failed attempts are counted per client address in a sliding window; over the limit the address's
  further *failed* attempts get 429 with ``Retry-After`` until old failures age out. A valid token
  always gets in, so tokenless noise from a shared address (a reverse proxy, a NAT) can never lock
  real users out; guessing stays hopeless because tokens are at least 16 random characters.
- The client address is the TCP peer, or, when the peer is one of ``trusted_proxies``, the
  right-most ``X-Forwarded-For`` hop that is not itself a trusted proxy (:func:`client_address`).
- A present ``Origin`` must be the server's own origin or in the allowlist (cross-site websocket
  hijacking; CORS does not apply to websockets). No ``Origin`` (a non-browser client) is fine.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from engine.core.access import Principal, TokenStore
from engine.core.errors import HooocusError
from hooocus_ws.protocol import TOKEN_SUBPROTOCOL_PREFIX

log = logging.getLogger("hooocus.ws.auth")

#: Query parameters that look like a credential; a request carrying one is refused.
_QUERY_TOKEN_NAMES = frozenset({"token", "access_token", "auth", "bearer", "api_key", "apikey", "key"})


@dataclass
class FailedAuthLimiter:
    """Sliding-window counter of failed auth attempts per address. ``clock`` is injectable for tests."""

    max_failures: int = 10
    window_s: float = 60.0
    max_addresses: int = 10_000
    clock: Callable[[], float] = time.monotonic
    _failures: collections.OrderedDict[str, collections.deque[float]] = field(
        default_factory=collections.OrderedDict)

    def _prune(self, address: str, now: float) -> collections.deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def retry_after_s(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None if it is not blocked."""
        now = self.clock()
        times = self._prune(address, now)
        if times is None or len(times) < self.max_failures:
            return None
        return max(0.001, times[0] + self.window_s - now)

    def record_failure(self, address: str) -> None:
        now = self.clock()
        times = self._prune(address, now)
        if times is None:
            times = collections.deque(maxlen=self.max_failures)
            self._failures[address] = times
            while len(self._failures) > self.max_addresses:  # bounded memory under an address-spraying attack
                self._failures.popitem(last=False)
        times.append(now)
        self._failures.move_to_end(address)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``trusted_proxies`` entries (addresses or CIDRs) as networks; a bad entry is a start-up error."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise HooocusError(f"trusted_proxies: {entry!r} is not an IP address or CIDR",
                               code="invalid_request", loc=("trusted_proxies",)) from None
    return tuple(networks)


def in_networks(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(peer: str | None, headers: Mapping[str, str], trusted_proxies: Sequence[Network]) -> str:
    """The address failed attempts are counted against. ``X-Forwarded-For`` is honoured only when
    the TCP peer is a trusted proxy, and then only up to the first hop (from the right) that is not
    trusted: every hop left of it was written by the untrusted client and could be forged."""
    address = peer or "unknown"
    if not trusted_proxies or not in_networks(address, trusted_proxies):
        return address
    forwarded = headers.get("x-forwarded-for")
    if not forwarded:
        return address
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        if not in_networks(hop, trusted_proxies):
            return hop
        address = hop
    return address


def bearer_token(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def subprotocol_token(subprotocols: Iterable[str]) -> str | None:
    for proto in subprotocols:
        if proto.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return proto[len(TOKEN_SUBPROTOCOL_PREFIX):] or None
    return None


def query_has_token(query_string: bytes | str) -> bool:
    text = query_string.decode("latin-1") if isinstance(query_string, bytes) else query_string
    return any(name.lower() in _QUERY_TOKEN_NAMES for name, _ in parse_qsl(text, keep_blank_values=True))


def _normalise_origin(origin: str) -> str:
    parts = urlsplit(origin.strip().lower())
    if not parts.scheme or not parts.netloc:
        return origin.strip().lower()
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    netloc = parts.netloc
    if default_port is not None and netloc.endswith(f":{default_port}"):
        netloc = netloc[: -len(f":{default_port}")]
    return f"{parts.scheme}://{netloc}"


def origin_allowed(origin: str | None, *, host: str | None, scheme: str, allowed_origins: Iterable[str]) -> bool:
    """True when there is no Origin, it is this server's own origin, or it is in the allowlist."""
    if origin is None:
        return True
    allowed = {_normalise_origin(o) for o in allowed_origins}
    if "*" in allowed:
        return True
    norm = _normalise_origin(origin)
    if norm == "null":  # sandboxed iframes, file:// pages: never trusted (ComfyUI's bypass)
        return False
    if norm in allowed:
        return True
    if host:
        own_scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        return norm == _normalise_origin(f"{own_scheme}://{host}")
    return False


class AuthFailure(HooocusError):
    """Raised by :meth:`AuthGate.authenticate`; carries what the HTTP denial needs."""

    def __init__(self, code: str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


@dataclass
class AuthGate:
    tokens: TokenStore
    limiter: FailedAuthLimiter = field(default_factory=FailedAuthLimiter)
    allowed_origins: tuple[str, ...] = ()
    #: Called with the reason after each failed attempt (metrics).
    on_failure: Callable[[str], None] | None = None
    #: Proxies whose ``X-Forwarded-For`` names the real client (see :func:`client_address`).
    trusted_proxies: tuple[Network, ...] = ()

    def address_of(self, peer: str | None, headers: Mapping[str, str]) -> str:
        return client_address(peer, headers, self.trusted_proxies)

    def refuse_if_blocked(self, address: str) -> None:
        """429 for an address over its failure budget (call only for a failed attempt)."""
        retry_after = self.limiter.retry_after_s(address)
        if retry_after is not None:
            self._failed("rate_limited")
            raise AuthFailure("rate_limited", "too many failed attempts; try again later", retry_after_s=retry_after)

    def record_failure(self, address: str, reason: str) -> None:
        self.limiter.record_failure(address)
        self._failed(reason)

    def authenticate(self, *, headers: Mapping[str, str], address: str, scheme: str, query_string: bytes | str = b"",
                     subprotocols: Iterable[str] = ()) -> Principal:
        """The caller's principal, or :class:`AuthFailure` (forbidden / rate_limited / unauthorized).

        A valid token is never rate limited; only a failed attempt from an address over its budget
        gets ``rate_limited`` (and is not counted again, so the block ends one window after the
        last counted failure)."""
        if not origin_allowed(headers.get("origin"), host=headers.get("host"), scheme=scheme,
                              allowed_origins=self.allowed_origins):
            self._failed("origin")
            raise AuthFailure("forbidden", "origin not allowed")
        if query_has_token(query_string):
            self.refuse_if_blocked(address)
            self.record_failure(address, "query_token")
            raise AuthFailure("unauthorized", "tokens are not accepted in the URL; use the Authorization header "
                                              "or the hooocus.token.* subprotocol")
        token = bearer_token(headers) or subprotocol_token(subprotocols)
        principal = self.tokens.verify(token)
        if principal is None:
            self.refuse_if_blocked(address)
            self.record_failure(address, "missing_token" if token is None else "bad_token")
            raise AuthFailure("unauthorized", "missing or invalid token")
        return principal

    def _failed(self, reason: str) -> None:
        if self.on_failure is not None:
            self.on_failure(reason)
