"""The auth gate's parts: failed-attempt limiter (row 3), origin rule (row 5), log redaction (row 4)."""

from __future__ import annotations

import pytest

from engine.core.access import TokenStore
from engine.core.errors import HooocusError
from hooocus_ws.auth import (
    AuthFailure,
    AuthGate,
    FailedAuthLimiter,
    bearer_token,
    client_address,
    origin_allowed,
    parse_networks,
    query_has_token,
    subprotocol_token,
)
from tests.ws.conftest import ALICE, TOKENS_TEXT


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_limiter_blocks_after_max_failures_and_forgets_after_the_window():
    clock = Clock()
    limiter = FailedAuthLimiter(max_failures=10, window_s=60, clock=clock)
    for _ in range(10):
        assert limiter.retry_after_s("1.2.3.4") is None
        limiter.record_failure("1.2.3.4")
    assert limiter.retry_after_s("1.2.3.4") == pytest.approx(60)
    assert limiter.retry_after_s("5.6.7.8") is None  # other addresses unaffected
    clock.now += 30
    assert limiter.retry_after_s("1.2.3.4") == pytest.approx(30)
    clock.now += 30.001
    assert limiter.retry_after_s("1.2.3.4") is None  # the window slid past every failure


def test_limiter_memory_is_bounded():
    limiter = FailedAuthLimiter(max_addresses=100, clock=Clock())
    for i in range(1000):
        limiter.record_failure(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._failures) == 100


@pytest.mark.parametrize(("origin", "allowed", "ok"), [
    (None, (), True),
    ("http://127.0.0.1:8188", (), True),  # same origin as the Host
    ("http://127.0.0.1:8189", (), False),
    ("https://evil.example", (), False),
    ("null", ("*",), True),
    ("null", (), False),
    ("https://app.example", ("https://app.example",), True),
    ("https://APP.example:443", ("https://app.example",), True),
    ("http://app.example", ("https://app.example",), False),
])
def test_origin_rule(origin, allowed, ok):
    assert origin_allowed(origin, host="127.0.0.1:8188", scheme="ws", allowed_origins=allowed) is ok


def test_token_sources():
    assert bearer_token({"authorization": "Bearer abc"}) == "abc"
    assert bearer_token({"authorization": "Basic abc"}) is None
    assert subprotocol_token(["hooocus.v1", "hooocus.token.abc"]) == "abc"
    assert subprotocol_token(["hooocus.v1"]) is None
    assert query_has_token(b"a=1&token=x") and query_has_token("access_token=") and not query_has_token(b"exp=1")


def test_gate_checks_in_order_and_counts_failures():
    reasons: list[str] = []
    gate = AuthGate(TokenStore.parse(TOKENS_TEXT), FailedAuthLimiter(max_failures=2, clock=Clock()),
                    on_failure=reasons.append)
    ok = gate.authenticate(headers={"authorization": f"Bearer {ALICE}"}, address="a", scheme="ws")
    assert ok.name == "alice"
    for headers in ({}, {"authorization": "Bearer nope"}):
        with pytest.raises(AuthFailure) as info:
            gate.authenticate(headers=headers, address="a", scheme="ws")
        assert info.value.code == "unauthorized"
    with pytest.raises(AuthFailure) as info:
        gate.authenticate(headers={}, address="a", scheme="ws")
    assert info.value.code == "rate_limited" and info.value.retry_after_s > 0
    # A valid token always gets in, however many failures its address has.
    assert gate.authenticate(headers={"authorization": f"Bearer {ALICE}"}, address="a", scheme="ws").name == "alice"
    with pytest.raises(AuthFailure) as info:  # a bad origin is refused before the token matters
        gate.authenticate(headers={"authorization": f"Bearer {ALICE}", "origin": "https://evil.example",
                                   "host": "127.0.0.1"}, address="b", scheme="ws")
    assert info.value.code == "forbidden"
    assert reasons == ["missing_token", "bad_token", "rate_limited", "origin"]


@pytest.mark.parametrize(("peer", "forwarded", "expected"), [
    ("10.0.0.1", "1.2.3.4", "10.0.0.1"),              # the peer is no proxy: header ignored
    ("127.0.0.1", None, "127.0.0.1"),
    ("127.0.0.1", "1.2.3.4", "1.2.3.4"),
    ("127.0.0.1", "6.6.6.6, 1.2.3.4", "1.2.3.4"),      # the left hops are the client's own claim
    ("127.0.0.1", "6.6.6.6, 1.2.3.4, 10.9.0.1", "1.2.3.4"),  # skip further trusted hops
    ("127.0.0.1", "10.9.0.2, 10.9.0.1", "10.9.0.2"),   # all trusted: the left-most we saw
    ("127.0.0.1", "garbage", "garbage"),
])
def test_client_address_honours_forwarded_only_from_trusted_proxies(peer, forwarded, expected):
    trusted = parse_networks(["127.0.0.1", "10.9.0.0/16"])
    headers = {} if forwarded is None else {"x-forwarded-for": forwarded}
    assert client_address(peer, headers, trusted) == expected


def test_bad_trusted_proxy_entry_is_a_clear_error():
    with pytest.raises(HooocusError) as info:
        parse_networks(["10.0.0.0/8", "proxy.example"])
    assert "proxy.example" in info.value.message and info.value.loc == ("trusted_proxies",)
