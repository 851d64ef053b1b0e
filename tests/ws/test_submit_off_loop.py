"""Issue 14: the engine decodes input images at submit, so the doors submit on a worker thread; a
slow decode must not stall the event loop (every other request and websocket). The decoder is
replaced by one that blocks until the test releases it, so nothing here depends on timing: before
the fix /healthz cannot answer at all while the decode blocks the loop.

HEALTHZ_TIMEOUT_S bounds the wait for /healthz; it only has to exceed a loopback round trip
(milliseconds) by a wide margin, and it is also how long the test takes to fail without the fix."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.core.runtime import Runtime
from hooocus_ws.client import SyncHooocusClient
from tests.ws.conftest import ALICE, auth, make_app, make_runtime, start_server

HEALTHZ_TIMEOUT_S = 5.0
#: How long the blocked decode waits for the test at most (a failing test must still end).
RELEASE_TIMEOUT_S = 30.0


class BlockingResolver:
    """Wraps the engine's input resolver: the first ``blocks`` calls wait for :attr:`release`."""

    def __init__(self, inner: Any, blocks: int = 1) -> None:
        self.inner, self.blocks = inner, blocks
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, request: Any, owner: str) -> Any:
        with self._lock:
            self.calls += 1
            block = self.calls <= self.blocks
        if block:
            self.entered.set()
            self.release.wait(RELEASE_TIMEOUT_S)
        return self.inner(request, owner)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Any, Runtime, BlockingResolver]]:
    runtime = make_runtime(tmp_path)
    resolver = BlockingResolver(runtime.engine.resolve_inputs)
    runtime.engine.resolve_inputs = resolver
    live = start_server(make_app(runtime), runtime)
    try:
        yield live, runtime, resolver
    finally:
        resolver.release.set()
        live.stop()


def _healthz_while_blocked(base: str, resolver: BlockingResolver) -> int:
    assert resolver.entered.wait(10), "the submit never reached the decoder"
    try:
        return httpx.get(f"{base}/healthz", timeout=HEALTHZ_TIMEOUT_S).status_code
    finally:
        resolver.release.set()


def test_http_generate_decoding_does_not_stall_healthz(served: Any) -> None:
    live, runtime, resolver = served
    base = live.ws_url.replace("ws://", "http://").removesuffix("/v1/ws")
    answers: list[int] = []
    post = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{base}/v1/generate", json={"prompt": "x", "steps": 2, "wait": False}, headers=auth(ALICE),
        timeout=60).status_code))
    post.start()
    assert _healthz_while_blocked(base, resolver) == 200
    post.join(60)
    assert answers == [202] and len(runtime.engine.jobs()) == 1


def test_websocket_generate_decoding_does_not_stall_healthz(served: Any) -> None:
    live, runtime, resolver = served
    base = live.ws_url.replace("ws://", "http://").removesuffix("/v1/ws")
    with SyncHooocusClient(live.ws_url, ALICE, timeout_s=60) as client:
        accepted: list[str] = []
        gen = threading.Thread(target=lambda: accepted.append(client.generate({"prompt": "x", "steps": 2}).job_id))
        gen.start()
        assert _healthz_while_blocked(base, resolver) == 200
        gen.join(60)
    assert len(accepted) == 1 and runtime.engine.get_job(accepted[0]) is not None


def test_racing_retries_of_one_request_id_queue_one_job(served: Any) -> None:
    """The idempotency check and the submit are one step even on threads: two POSTs with the same
    request_id, the first held inside the decoder, give one job (the second is the duplicate)."""
    live, runtime, resolver = served
    base = live.ws_url.replace("ws://", "http://").removesuffix("/v1/ws")
    body = {"prompt": "x", "steps": 2, "wait": False, "request_id": "same-key"}
    replies: list[dict] = []

    def post() -> None:
        replies.append(httpx.post(f"{base}/v1/generate", json=body, headers=auth(ALICE), timeout=60).json())

    first = threading.Thread(target=post)
    first.start()
    assert resolver.entered.wait(10)
    second = threading.Thread(target=post)
    second.start()
    second.join(0.5)  # it waits on the claim while the first decodes (join just gives it time to try)
    resolver.release.set()
    first.join(60)
    second.join(60)
    assert len(runtime.engine.jobs()) == 1
    assert sorted(r["duplicate"] for r in replies) == [False, True]
    assert {r["job_id"] for r in replies} == {runtime.engine.jobs()[0].job_id}
