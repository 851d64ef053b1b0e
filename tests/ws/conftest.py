"""Fixtures for the websocket front door: a FakeRunner runtime, the app, a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from engine.core.access import TokenStore
from engine.core.inputs import InputResolver, UploadStore
from engine.core.jobs import Engine, Runner
from engine.core.runtime import Runtime
from engine.core.settings import Settings
from engine.core.store import ImageStore
from engine.core.testing import FakeRunner
from hooocus_ws.app import create_app, drain
from hooocus_ws.cli import HooocusServer, uvicorn_config
from hooocus_ws.context import ServerLimits
from hooocus_ws.protocol import decode_frame, validate_server_message

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"
ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcde"  # may cancel its own jobs, may not generate
TOKENS_TEXT = f"""
# name token scopes
alice  {ALICE}  generate,cancel:own
bob    {BOB}    generate,cancel:own
admin  {ADMIN}  admin
reader {READER} cancel:own
"""


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_runtime(tmp_path: Path, runner: Runner | None = None, *, queue_size: int = 16,
                 per_owner: int | None = None) -> Runtime:
    settings = Settings(data_dir=tmp_path, shutdown_grace_s=0.2, queue_size=queue_size,
                        max_upload_bytes=256 * 1024, max_input_pixels=1_000_000)
    images = ImageStore()
    uploads = UploadStore(max_upload_bytes=settings.max_upload_bytes, max_pixels=settings.max_input_pixels)
    resolver = InputResolver(uploads, images=images, max_pixels=settings.max_input_pixels,
                             max_upload_bytes=settings.max_upload_bytes)
    engine = Engine(runner or FakeRunner(), max_queue=queue_size, max_queued_per_owner=per_owner,
                    image_sink=images.put, resolve_inputs=resolver)
    return Runtime(settings=settings, engine=engine, images=images, uploads=uploads)


def make_app(runtime: Runtime, **kwargs: Any) -> Any:
    kwargs.setdefault("tokens", TokenStore.parse(TOKENS_TEXT))
    return create_app(runtime, **kwargs)


@pytest.fixture
def tokens() -> TokenStore:
    return TokenStore.parse(TOKENS_TEXT)


class WsReader:
    """Wraps a TestClient websocket: every text message is checked against the published schema."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[tuple[int, dict[str, Any], bytes]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send_text(json.dumps(message))

    def recv(self) -> dict[str, Any]:
        """The next JSON message (binary frames in between are decoded into ``frames``)."""
        while True:
            raw = self.ws.receive()
            if raw["type"] == "websocket.close":
                raise ConnectionError(f"closed {raw.get('code')}")
            if raw.get("text") is not None:
                message = json.loads(raw["text"])
                validate_server_message(message)
                return message
            self.frames.append(decode_frame(raw["bytes"]))

    def until(self, predicate: Callable[[dict[str, Any]], bool], limit: int = 2000) -> list[dict[str, Any]]:
        seen = []
        for _ in range(limit):
            message = self.recv()
            seen.append(message)
            if predicate(message):
                return seen
        raise AssertionError(f"predicate never matched in {limit} messages")

    def until_type(self, *types: str, job_id: str | None = None) -> list[dict[str, Any]]:
        return self.until(lambda m: m["type"] in types and (job_id is None or m.get("job_id") == job_id))


@pytest.fixture
def fake_runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def runtime(tmp_path: Path, fake_runner: FakeRunner) -> Runtime:
    return make_runtime(tmp_path, fake_runner)


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(make_app(runtime)) as test_client:
        yield test_client


def connect(client: TestClient, token: str = ALICE, **kwargs: Any) -> Any:
    headers = {**auth(token), **kwargs.pop("headers", {})}
    return client.websocket_connect("/v1/ws", headers=headers, **kwargs)


def open_session(client: TestClient, token: str = ALICE, **kwargs: Any) -> tuple[Any, WsReader]:
    """Enter a websocket context and consume the hello; caller must exit the context."""
    cm = connect(client, token, **kwargs)
    ws = cm.__enter__()
    reader = WsReader(ws)
    hello = reader.recv()
    assert hello["type"] == "hello"
    return cm, reader


# -- a real uvicorn on 127.0.0.1 --------------------------------------------------------------------


@dataclass
class LiveServer:
    server: HooocusServer
    thread: threading.Thread
    runtime: Runtime

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def start_server(app: Any, runtime: Runtime | None, *, max_message_bytes: int = 64 * 1024, ping_interval_s: float = 20.0,
                 ping_timeout_s: float = 20.0, graceful_shutdown_s: float = 5.0, **config_kwargs: Any) -> LiveServer:
    if runtime is not None:  # a bare echo app (the Autobahn run) has none: uvicorn_config's default applies
        config_kwargs.setdefault("max_upload_bytes", runtime.settings.max_upload_bytes)
    config = uvicorn_config(app, host="127.0.0.1", port=0, max_message_bytes=max_message_bytes,
                            log_level="warning", ping_interval_s=ping_interval_s, ping_timeout_s=ping_timeout_s,
                            graceful_shutdown_s=graceful_shutdown_s, **config_kwargs)
    # What `hooocus serve` runs: drain (jobs end, outboxes flush) before the sockets close with 1012.
    server = HooocusServer(config, before_shutdown=lambda: drain(app.state.hooocus))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    return LiveServer(server, thread, runtime)


@pytest.fixture
def live_factory() -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def factory(runtime: Runtime, *, limits: ServerLimits | None = None, **kwargs: Any) -> LiveServer:
        app_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("default_preview", "allowed_origins")}
        app = make_app(runtime, limits=limits, **app_kwargs)
        live = start_server(app, runtime, max_message_bytes=(limits or ServerLimits()).max_message_bytes, **kwargs)
        started.append(live)
        return live

    yield factory
    for live in started:
        if live.thread.is_alive():
            live.stop()


def run_async(coro: Any, timeout_s: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))
