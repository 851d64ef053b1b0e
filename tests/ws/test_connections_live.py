"""Issue 11.3 and 11.9 against a real uvicorn on 127.0.0.1 with raw sockets: connections that never
finish their headers are closed after the header timeout, one address cannot hold more than its cap
of connections, and a non-UTF-8 text frame costs one log line (not a traceback)."""

from __future__ import annotations

import base64
import logging
import os
import socket
import time
from pathlib import Path

import httpx

from tests.ws.conftest import ALICE, make_app, make_runtime, start_server

#: Generous: the guards act within header_timeout_s (0.5 s here); this only bounds a hung test.
WAIT_S = 15.0


def stalled_socket(port: int) -> socket.socket:
    """A connection that sent half a request and then nothing (slowloris)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return data
        if not chunk:
            return data
        data += chunk


def test_stalled_headers_are_cut_off_and_one_address_is_capped(tmp_path: Path):
    runtime = make_runtime(tmp_path)
    live = start_server(make_app(runtime), runtime, header_timeout_s=0.5, max_connections_per_address=8)
    sockets = []
    try:
        sockets = [stalled_socket(live.port) for _ in range(40)]
        # The 32 over the cap are answered 503 at once; the first 8 are closed by the header timeout.
        answers = [read_until_closed(sock) for sock in sockets]
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(refused) == 32 and all(b'"rate_limited"' in a for a in refused)
        assert sum(1 for a in answers if a == b"") == 8
        # Nothing is left holding a slot: the server answers again from the same address.
        response = httpx.get(f"{live.http_url}/healthz", timeout=WAIT_S)
        assert response.status_code == 200
        # A normal keep-alive client is unaffected: several requests on one connection.
        with httpx.Client(base_url=live.http_url, timeout=WAIT_S) as client:
            assert [client.get("/healthz").status_code for _ in range(3)] == [200, 200, 200]
    finally:
        for sock in sockets:
            sock.close()
        live.stop()


def test_websockets_count_against_the_address_cap_and_free_it_on_close(tmp_path: Path):
    from websockets.sync.client import connect

    runtime = make_runtime(tmp_path)
    live = start_server(make_app(runtime), runtime, header_timeout_s=0.5, max_connections_per_address=2)
    try:
        headers = {"Authorization": f"Bearer {ALICE}"}
        with connect(live.ws_url, additional_headers=headers, open_timeout=WAIT_S) as first:
            first.recv(WAIT_S)
            time.sleep(1.0)  # past the header timeout: an upgraded connection is not cut off
            with connect(live.ws_url, additional_headers=headers, open_timeout=WAIT_S) as second:
                second.recv(WAIT_S)
                assert httpx.get(f"{live.http_url}/healthz", timeout=WAIT_S).status_code == 503  # the cap
            first.ping().wait(WAIT_S)  # still open
        deadline = time.monotonic() + WAIT_S
        while httpx.get(f"{live.http_url}/healthz", timeout=WAIT_S).status_code != 200:
            assert time.monotonic() < deadline, "closed websockets never gave their slots back"
            time.sleep(0.05)
    finally:
        live.stop()


def test_invalid_utf8_text_frame_logs_one_line(tmp_path: Path, caplog):
    runtime = make_runtime(tmp_path)
    live = start_server(make_app(runtime), runtime)
    caplog.set_level(logging.INFO)
    try:
        sock = socket.create_connection(("127.0.0.1", live.port), timeout=WAIT_S)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Authorization: Bearer {ALICE}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101")
        payload, mask = b"\xff\xfe", os.urandom(4)
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        rest = read_until_closed(sock)
        assert b"\x88\x02\x03\xef" in rest  # close frame, code 1007
        sock.close()
    finally:
        live.stop()
    utf8 = [r for r in caplog.records if "UTF-8" in r.getMessage()]
    assert utf8 and all(r.exc_info is None and r.exc_text is None for r in utf8)


def test_healthz_answers_503_while_draining(tmp_path: Path):
    """Issue 11.11: docs/protocol.md promises 503 from /healthz during the drain; the listener used to
    close at once, so a load balancer saw connection errors instead."""
    import threading

    from engine.core.testing import FakeRunner, StepGate

    gate = StepGate(1)
    runtime = make_runtime(tmp_path, FakeRunner(on_step=gate))
    live = start_server(make_app(runtime, shutdown_grace_s=WAIT_S), runtime)
    released = threading.Event()
    try:
        job = runtime.engine.submit({"steps": 2}, owner="alice")
        assert gate.reached.wait(WAIT_S)
        assert httpx.get(f"{live.http_url}/healthz", timeout=WAIT_S).status_code == 200
        live.server.should_exit = True  # what SIGTERM does; the running job holds the drain open
        deadline = time.monotonic() + WAIT_S
        while True:
            response = httpx.get(f"{live.http_url}/healthz", timeout=WAIT_S)
            if response.status_code == 503:
                break
            assert time.monotonic() < deadline, "never answered 503 while draining"
            time.sleep(0.02)
        assert response.json()["status"] == "shutting_down"
        refused = httpx.post(f"{live.http_url}/v1/generate", json={"wait": False}, timeout=WAIT_S,
                             headers={"Authorization": f"Bearer {ALICE}"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        gate.release()
        released.set()
        assert job.wait(WAIT_S) and job.state.value == "done"  # the grace let it finish
        live.thread.join(WAIT_S)
        assert not live.thread.is_alive()
    finally:
        if not released.is_set():
            gate.release()
        if live.thread.is_alive():
            live.stop()
