"""Fixtures for the MCP front door: a started runtime over the torch-free FakeRunner, principals,
and a real uvicorn server on 127.0.0.1 for the HTTP tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import pytest
import uvicorn

from engine.core.access import Principal
from engine.core.inputs import InputResolver, UploadStore
from engine.core.jobs import Engine, Job, JobState
from engine.core.runtime import Runtime
from engine.core.settings import Settings
from engine.core.store import ImageStore
from engine.core.testing import FakeRunner, StepGate

STDIO = Principal("stdio", frozenset({"generate", "cancel:own"}))
ALICE_TOKEN = "alice-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdefgh"
TOKENS_TEXT = f"alice {ALICE_TOKEN}\nbob {BOB_TOKEN}\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the backends hand engine events over with asyncio's call_soon_threadsafe


def make_runtime(runner: FakeRunner) -> Runtime:
    images = ImageStore()
    return Runtime(Settings(), Engine(runner, image_sink=images.put), images)


def make_inputs_runtime(runner: FakeRunner) -> Runtime:
    """A runtime whose engine resolves image references (uploads and generated images): the image tools."""
    images, uploads = ImageStore(), UploadStore()
    engine = Engine(runner, image_sink=images.put, resolve_inputs=InputResolver(uploads, images=images))
    return Runtime(Settings(), engine, images, uploads=uploads)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def runtime(runner: FakeRunner) -> Iterator[Runtime]:
    rt = make_runtime(runner).start()
    yield rt
    rt.close()


@dataclass
class LiveServer:
    url: str
    server: uvicorn.Server


@contextlib.contextmanager
def live_server(app, *, host: str = "127.0.0.1") -> Iterator[LiveServer]:
    """Run ``app`` under a real uvicorn on an ephemeral loopback port, in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", ws="websockets-sansio"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(url=f"http://{host}:{port}", server=server)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


async def cancel_tool_call_mid_job(client, runtime: Runtime, gate: StepGate, tool: str, arguments: dict) -> Job:
    """Start ``tool`` through ``client``, cancel the call (the client side) once the job reaches the
    gate's step, and check that this cancels the engine job: its token is set within 5 s and, once the
    gate lets the runner go on, the job ends CANCELLED. Returns the job (the runtime's first)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.call_tool, tool, arguments)
        assert await anyio.to_thread.run_sync(gate.reached.wait, 10)
        tg.cancel_scope.cancel()
    victim = runtime.engine.jobs()[0]
    with anyio.fail_after(5):
        while not victim.cancel_token.is_set():
            await anyio.sleep(0.01)
    gate.release()
    assert await anyio.to_thread.run_sync(victim.wait, 5)
    assert victim.state is JobState.CANCELLED
    return victim
