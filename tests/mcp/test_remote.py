"""Proxy mode (``hooocus mcp --connect``): the same tools over a websocket client to ``hooocus serve``.

A stand-in client with the ``hooocus_ws.client`` interface (``generate`` → a stream with ``job_id``
of hooocus.v1 event dicts, ``cancel``, ``close``) drives a real engine, so the backend's event
handling, image collection and cancel forwarding are tested without the network. The end-to-end
test against the real websocket client and app skips until those exist.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.util
from typing import Any

import anyio
import pytest

from engine.core.events import Cancelled, Done, Failed, ImageReady, Progress, Queued, Started
from engine.core.jobs import Job, JobState
from engine.core.request import GenerationRequest
from engine.core.runtime import Runtime
from engine.core.testing import FakeRunner, StepGate
from hooocus_mcp._sdk import Client, ImageContent
from hooocus_mcp.backend import job_view
from hooocus_mcp.remote import RemoteBackend, event_from_message
from hooocus_mcp.tools import ServerOptions, build_server
from tests.mcp.conftest import STDIO, make_runtime

pytestmark = pytest.mark.anyio


def v1_message(event: Any, first: bool) -> dict[str, Any]:
    """An engine event as the hooocus.v1 server sends it (``Event.to_wire``, as the session does)."""
    if isinstance(event, Queued) and first:  # the reply to generate opens the stream
        return {"type": "accepted", "job_id": event.job_id, "position": event.position, "duplicate": False}
    message = event.to_wire()
    if isinstance(event, ImageReady):
        message["data"] = event.data  # the client joins the binary frame to its image event
    return message


class StandInStream:
    def __init__(self, job: Job) -> None:
        self.job_id = job.job_id
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.subscribe(lambda e: loop.call_soon_threadsafe(self._queue.put_nowait, e), after_seq=0)
        self._first = True

    def __aiter__(self) -> StandInStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            event = await self._queue.get()
            if event is None:
                raise StopAsyncIteration
            if isinstance(event, Cancelled | Done | Failed):
                self._queue.put_nowait(None)
            if event.kind == "preview":
                continue
            message = v1_message(event, self._first)
            self._first = False
            return message


class StandInClient:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.cancelled: list[str] = []
        self.closed = False
        self.accept_delay_s = 0.0  # the server's "accepted" reply arrives this late

    async def generate(self, params: dict[str, Any]) -> StandInStream:
        stream = StandInStream(self.runtime.engine.submit(params, owner="token-principal"))
        await anyio.sleep(self.accept_delay_s)
        return stream

    async def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        self.runtime.engine.cancel(job_id)

    async def close(self) -> None:
        self.closed = True


@contextlib.asynccontextmanager
async def proxied(runtime: Runtime):
    client = StandInClient(runtime)

    async def connect() -> StandInClient:
        return client

    backend = RemoteBackend(connect)
    server = build_server(backend, ServerOptions(default_caller=STDIO, progress_min_interval_s=0))
    try:
        async with Client(server) as mcp:
            yield mcp, client
    finally:
        await backend.aclose()
    assert client.closed


def test_v1_messages_become_engine_events() -> None:
    assert event_from_message({"type": "accepted", "job_id": "j", "position": 2}) == Queued(job_id="j", position=2)
    started = event_from_message({"type": "started", "job_id": "j", "job_seq": 2, "params": {"steps": 4},
                                  "seeds": ["18446744073709551615"], "total_steps": 4})
    assert isinstance(started, Started) and started.seeds == (2**64 - 1,) and started.total_steps == 4
    progress = event_from_message({"type": "progress", "job_id": "j", "step": 3, "total_steps": 4, "stage": "sample",
                                   "image_index": 1, "image_count": 2})
    assert progress == Progress(job_id="j", step=3, total_steps=4, image_index=1, image_count=2)
    image = event_from_message({"type": "image", "job_id": "j", "index": 0, "seed": "5", "sha256": "ab",
                                "width": 8, "height": 8, "mime": "image/png", "size_bytes": 3, "url": "/x"})
    assert isinstance(image, ImageReady) and image.seed == 5 and image.data == b""
    failed = event_from_message({"type": "error", "job_id": "j", "code": "out_of_memory", "message": "m"})
    assert isinstance(failed, Failed) and failed.code == "out_of_memory"
    assert event_from_message({"type": "error", "code": "queue_full", "message": "m"}) is None  # not a job event
    assert event_from_message({"type": "pong"}) is None
    # Only the protocol's own names (docs/protocol.md): "queue" and "error", never "queued"/"failed".
    assert event_from_message({"type": "queued", "job_id": "j", "position": 1}) is None
    assert event_from_message({"type": "failed", "job_id": "j", "code": "x", "message": "m"}) is None


async def test_a_remote_job_has_the_engine_job_states_and_view(runtime: Runtime) -> None:
    """The proxy mirrors a server job in an engine Job, so get_job shows what the server's own
    job_view shows (the same state machine), for a finished and for a cancelled job."""
    client = StandInClient(runtime)

    async def connect() -> StandInClient:
        return client

    backend = RemoteBackend(connect)
    try:
        done_id = await backend.submit(GenerationRequest(prompt="fox", image_number=2), STDIO)
        async with backend.follow(done_id, STDIO) as events:
            kinds = [type(event).__name__ async for event in events]
        assert kinds[0] == "Queued" and kinds[1] == "Started" and kinds[-1] == "Done"
        remote = await backend.job(done_id, STDIO)
        server = job_view(runtime.engine.require_job(done_id), None)
        assert remote.state == JobState.DONE.value and remote.queue_position is None
        for name in ("state", "params", "seeds", "done_steps", "total_steps", "images", "error"):
            assert getattr(remote, name) == getattr(server, name), name
        assert remote.started_at is not None and remote.finished_at is not None
        assert await backend.cancel(done_id, STDIO) is False  # already finished: nothing to forward
        assert client.cancelled == []
    finally:
        await backend.aclose()


async def test_a_stream_that_ends_early_fails_the_remote_job_as_connection_lost() -> None:
    class CutStream:
        job_id = "j_cut"

        def __init__(self) -> None:
            self._messages = [{"type": "accepted", "job_id": "j_cut", "position": 1},
                              {"type": "started", "job_id": "j_cut", "job_seq": 2, "params": {}, "seeds": ["3"],
                               "total_steps": 4}]

        def __aiter__(self) -> CutStream:
            return self

        async def __anext__(self) -> dict[str, Any]:
            if not self._messages:
                raise StopAsyncIteration  # the server went away mid-job
            return self._messages.pop(0)

    class CutClient:
        async def generate(self, params: dict[str, Any]) -> CutStream:
            return CutStream()

        async def close(self) -> None:
            pass

    async def connect() -> CutClient:
        return CutClient()

    backend = RemoteBackend(connect)
    try:
        job_id = await backend.submit(GenerationRequest(prompt="x"), STDIO)
        async with backend.follow(job_id, STDIO) as events:
            last = [event async for event in events][-1]
        assert isinstance(last, Failed) and last.code == "connection_lost"
        view = await backend.job(job_id, STDIO)
        assert view.state == JobState.FAILED.value and view.seeds == ("3",)
        assert view.error is not None and view.error["code"] == "connection_lost"
    finally:
        await backend.aclose()


async def test_proxy_generates_and_serves_images(runtime: Runtime) -> None:
    values: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        values.append(progress)

    async with proxied(runtime) as (mcp, _):
        result = await mcp.call_tool("generate_image", {"prompt": "fox", "performance": "Lightning",
                                                        "image_number": 2}, progress_callback=on_progress)
        assert result.structured_content["status"] == "completed", result.content[0]
        assert len([c for c in result.content if isinstance(c, ImageContent)]) == 2
        for ref in result.structured_content["images"]:
            blob = base64.b64decode((await mcp.read_resource(ref["uri"])).contents[0].blob)
            assert hashlib.sha256(blob).hexdigest() == ref["sha256"]
        job_id = result.structured_content["job_id"]
        again = await mcp.call_tool("get_job", {"job_id": job_id})
        options = await mcp.call_tool("list_options", {})
    assert again.structured_content == result.structured_content
    assert values == sorted(set(values)) and values[-1] == 8
    assert "euler" in options.structured_content["samplers"]


async def test_proxy_forwards_cancellation_and_errors() -> None:
    gate = StepGate(2)
    runtime = make_runtime(FakeRunner(on_step=gate)).start()
    try:
        async with proxied(runtime) as (mcp, client):
            async with anyio.create_task_group() as tg:
                tg.start_soon(mcp.call_tool, "generate_image", {"prompt": "victim", "performance": "Speed"})
                assert await anyio.to_thread.run_sync(gate.reached.wait, 10)
                tg.cancel_scope.cancel()
            victim = runtime.engine.jobs()[0]
            assert client.cancelled == [victim.job_id]
            gate.release()
            assert await anyio.to_thread.run_sync(victim.wait, 5) and victim.state is JobState.CANCELLED
            bad = await mcp.call_tool("generate_image", {"prompt": "x", "styles": ["Nope"]})
            assert bad.is_error and "unknown_style" in bad.content[0].text
            missing = await mcp.call_tool("get_job", {"job_id": victim.job_id + "0"})
            assert missing.is_error and "not_found" in missing.content[0].text
    finally:
        runtime.close()


async def test_a_cancel_while_the_server_accepts_the_job_still_reaches_it() -> None:
    gate = StepGate(1)
    runtime = make_runtime(FakeRunner(on_step=gate)).start()
    try:
        async with proxied(runtime) as (mcp, client):
            client.accept_delay_s = 0.5
            async with anyio.create_task_group() as tg:
                tg.start_soon(mcp.call_tool, "generate_image", {"prompt": "victim", "performance": "Speed"})
                assert await anyio.to_thread.run_sync(gate.reached.wait, 10)  # running; reply not yet seen
                tg.cancel_scope.cancel()
            victim = runtime.engine.jobs()[0]
            assert client.cancelled == [victim.job_id]
            gate.release()
            assert await anyio.to_thread.run_sync(victim.wait, 5) and victim.state is JobState.CANCELLED
    finally:
        runtime.close()


async def test_an_unreachable_server_is_a_clear_tool_error(runtime: Runtime) -> None:
    attempts = []

    async def refuse() -> Any:
        attempts.append(1)
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    backend = RemoteBackend(refuse)
    async with Client(build_server(backend, ServerOptions(default_caller=STDIO))) as mcp:
        for _ in range(2):
            result = await mcp.call_tool("generate_image", {"prompt": "x"})
            assert result.is_error and "connection_lost: cannot reach the hooocus server" in result.content[0].text
        options = await mcp.call_tool("list_options", {})
    assert len(attempts) == 2  # every call tries to connect again
    assert "euler" in options.structured_content["samplers"]  # the fixed lists are still known


@pytest.mark.skipif(importlib.util.find_spec("hooocus_ws.client") is None
                    or importlib.util.find_spec("hooocus_ws.app") is None,
                    reason="hooocus_ws.client / hooocus_ws.app (the websocket front door) are not written yet")
async def test_proxy_over_the_real_websocket_client(runtime: Runtime, runner: FakeRunner) -> None:
    from engine.core.access import TokenStore
    from hooocus_ws.app import create_app
    from tests.mcp.conftest import ALICE_TOKEN, TOKENS_TEXT, live_server

    app = create_app(runtime, tokens=TokenStore.parse(TOKENS_TEXT), manage_runtime=False)
    with live_server(app) as live:
        # The websocket client as the product CLI joins it in (hooocus_mcp does not import hooocus_ws).
        from hooocus.cli import connect_ws_client

        backend = RemoteBackend.for_url(live.url.replace("http", "ws") + "/v1/ws", ALICE_TOKEN,
                                        connect_client=connect_ws_client)
        server = build_server(backend, ServerOptions(default_caller=STDIO))
        try:
            async with Client(server) as mcp:
                result = await mcp.call_tool("generate_image", {"prompt": "fox", "performance": "Lightning"})
                assert result.structured_content["status"] == "completed", result.content[0]
                ref = result.structured_content["images"][0]
                blob = base64.b64decode((await mcp.read_resource(ref["uri"])).contents[0].blob)
                assert hashlib.sha256(blob).hexdigest() == ref["sha256"]
                options = await mcp.call_tool("list_options", {})
                assert options.structured_content == runtime.engine.runner.options()
                gate = runner.on_step = StepGate(2)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(mcp.call_tool, "generate_image", {"prompt": "victim", "performance": "Speed"})
                    assert await anyio.to_thread.run_sync(gate.reached.wait, 10)
                    tg.cancel_scope.cancel()
                victim = runtime.engine.jobs()[-1]
                with anyio.fail_after(5):
                    while not victim.cancel_token.is_set():
                        await anyio.sleep(0.01)
                gate.release()
                assert await anyio.to_thread.run_sync(victim.wait, 5) and victim.state is JobState.CANCELLED
        finally:
            await backend.aclose()
    assert {job.owner for job in runtime.engine.jobs()} == {"alice"}
