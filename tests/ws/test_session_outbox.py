"""The per-connection outbox (matrix row 24 in isolation): previews coalesce in one slot while the
socket is stuck, progress is never dropped, and an outbox past its bound closes the connection.
First the :class:`hooocus_ws.outbox.Outbox` alone, then through a Session's public surface."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from starlette.websockets import WebSocketState

from engine.core.access import TokenStore
from engine.core.events import Preview, Progress
from engine.core.request import GenerationRequest
from hooocus_ws.auth import AuthGate
from hooocus_ws.context import ServerContext, ServerLimits
from hooocus_ws.outbox import MESSAGE_OVERHEAD_BYTES, Outbox
from hooocus_ws.protocol import FRAME_PREVIEW, PreviewSettings, decode_frame, validate_server_message
from hooocus_ws.session import Session, TokenBucket
from hooocus_ws.signing import UrlSigner
from tests.ws.conftest import ALICE, TOKENS_TEXT, make_runtime, run_async


class StuckSink:
    """Where a flushing outbox writes: ``send`` blocks until ``unblock`` is set, as for a client
    that stopped reading."""

    def __init__(self) -> None:
        self.unblock = asyncio.Event()
        self.messages: list[dict[str, Any]] = []
        self.binaries: list[bytes] = []
        self.previews: list[Preview] = []

    async def send(self, message: dict[str, Any], binary: bytes | None) -> None:
        await self.unblock.wait()
        self.messages.append(dict(message))
        if binary is not None:
            self.binaries.append(binary)

    async def send_preview(self, preview: Preview) -> None:
        await self.unblock.wait()
        self.previews.append(preview)


def progress_message(step: int) -> dict[str, Any]:
    return Progress(job_id="j_1", seq=step + 1, step=step, total_steps=50).to_wire()


def test_outbox_keeps_every_message_in_order_and_only_the_newest_preview():
    async def scenario() -> tuple[Outbox, StuckSink]:
        outbox = Outbox(max_messages=1000, max_bytes=1 << 20)
        sink = StuckSink()
        writer = asyncio.create_task(outbox.flush(sink.send, sink.send_preview, lambda: 0.0))
        outbox.push(progress_message(0))  # the writer takes it and gets stuck
        await asyncio.sleep(0.01)
        assert outbox.has_pending_output and outbox.pending_messages == 0
        for step in range(1, 51):  # the worker keeps going at full speed
            outbox.push(progress_message(step))
            outbox.offer_preview(Preview(job_id="j_1", step=step, rgb=np.zeros((4, 4, 3), dtype=np.uint8)))
        assert outbox.latest_preview is not None and outbox.latest_preview.step == 50
        assert outbox.previews_dropped == 49
        assert outbox.pending_messages == 50
        assert outbox.pending_bytes == 50 * MESSAGE_OVERHEAD_BYTES
        sink.unblock.set()
        outbox.close_when_empty()
        assert await asyncio.wait_for(writer, 5) == "drained"
        return outbox, sink

    outbox, sink = run_async(scenario())
    assert [m["step"] for m in sink.messages] == list(range(0, 51))
    assert [m["seq"] for m in sink.messages] == list(range(1, 52))
    assert outbox.sent_messages == 51 and not outbox.has_pending_output
    # Messages first; a preview only goes when nothing else waits, and a closing outbox returns as
    # soon as its never-dropped messages are out (a preview is droppable by design).
    assert sink.previews == []


def test_outbox_sends_the_newest_preview_when_idle_and_respects_the_interval():
    now = [100.0]

    async def scenario() -> StuckSink:
        outbox = Outbox(max_messages=10, max_bytes=1 << 20, clock=lambda: now[0])
        sink = StuckSink()
        sink.unblock.set()
        writer = asyncio.create_task(outbox.flush(sink.send, sink.send_preview, lambda: 0.5))
        outbox.offer_preview(Preview(job_id="j", step=1))
        await asyncio.sleep(0.01)
        assert [p.step for p in sink.previews] == [1]
        outbox.offer_preview(Preview(job_id="j", step=2))  # within 0.5 s of the last one: waits
        await asyncio.sleep(0.01)
        assert [p.step for p in sink.previews] == [1] and outbox.latest_preview is not None
        outbox.discard_previews("other-job")  # someone else's job ending leaves it alone
        assert outbox.latest_preview is not None
        now[0] += 0.5
        outbox.push({"type": "pong", "re": 1})  # any wake-up re-checks the interval
        await asyncio.sleep(0.01)
        assert [p.step for p in sink.previews] == [1, 2]
        outbox.offer_preview(Preview(job_id="j", step=3))
        outbox.discard_previews("j")  # the job ended: its stale preview is not sent
        assert outbox.latest_preview is None
        outbox.close_when_empty()
        assert await asyncio.wait_for(writer, 5) == "drained"
        return sink

    sink = run_async(scenario())
    assert [p.step for p in sink.previews] == [1, 2] and [m["type"] for m in sink.messages] == ["pong"]


def test_outbox_overflow_by_count_or_bytes_refuses_more_and_ends_the_flush():
    async def scenario(outbox: Outbox, pushes: list[tuple[dict[str, Any], bytes | None]]) -> tuple[list[bool], str]:
        sink = StuckSink()
        sink.unblock.set()
        accepted = [outbox.push(message, binary) for message, binary in pushes]
        return accepted, await asyncio.wait_for(outbox.flush(sink.send, sink.send_preview, lambda: None), 5)

    by_count = Outbox(max_messages=5, max_bytes=1 << 20)
    accepted, outcome = run_async(scenario(by_count, [({"type": "pong", "re": i}, None) for i in range(10)]))
    assert accepted == [True] * 5 + [False] * 5 and outcome == "overflow" and by_count.overflowed
    # Bytes: two 1000-byte frames fit in 2 * (1000 + overhead); a third does not.
    limit = 2 * (1000 + MESSAGE_OVERHEAD_BYTES)
    by_bytes = Outbox(max_messages=100, max_bytes=limit)
    accepted, outcome = run_async(scenario(by_bytes, [({"type": "image"}, b"x" * 1000)] * 3))
    assert accepted == [True, True, False] and outcome == "overflow"


# -- the same through a Session (only its public surface: run(), outbox, the socket) ---------------


class StuckSocket:
    """A websocket whose sends block until ``unblock`` is set: a client that stopped reading.
    ``incoming`` feeds the session's reader; ``close`` records the code."""

    application_state = WebSocketState.CONNECTED

    def __init__(self) -> None:
        self.unblock = asyncio.Event()
        self.sent: list[str | bytes] = []
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed_with: tuple[int, str] | None = None

    def client_sends(self, message: dict[str, Any]) -> None:
        self.incoming.put_nowait({"type": "websocket.receive", "text": json.dumps(message)})

    async def receive(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send_text(self, text: str) -> None:
        await self.unblock.wait()
        self.sent.append(text)

    async def send_bytes(self, data: bytes) -> None:
        await self.unblock.wait()
        self.sent.append(data)

    async def close(self, code: int, reason: str = "") -> None:
        self.closed_with = (code, reason)


def make_session(tmp_path: Path, limits: ServerLimits) -> tuple[Session, StuckSocket]:
    tokens = TokenStore.parse(TOKENS_TEXT)
    ctx = ServerContext(runtime=make_runtime(tmp_path), gate=AuthGate(tokens), limits=limits, signer=UrlSigner(),
                        default_preview=PreviewSettings(min_interval_ms=0))
    socket = StuckSocket()
    session = Session(socket, ctx, tokens.verify(ALICE))  # type: ignore[arg-type]
    return session, socket


async def wait_for(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_slow_reader_gets_only_the_latest_preview_and_every_progress(tmp_path):
    async def scenario() -> tuple[Session, StuckSocket]:
        session, socket = make_session(tmp_path, ServerLimits())
        job = session.ctx.runtime.engine.submit(GenerationRequest(), owner="alice")  # not started: stays queued
        running = asyncio.create_task(session.run())
        socket.client_sends({"type": "subscribe", "id": 1, "job_id": job.job_id})
        await wait_for(lambda: session.outbox.pending_messages >= 2)  # the writer is stuck on the hello
        job.emit(Progress(job_id="", step=0, total_steps=50))
        for step in range(1, 51):  # the worker keeps going at full speed
            job.emit(Progress(job_id="", step=step, total_steps=50))
            job.emit(Preview(job_id="", step=step, rgb=np.full((32, 32, 3), step, dtype=np.uint8)))
        await wait_for(lambda: session.ctx.metrics.previews_dropped == 49)
        assert session.outbox.latest_preview is not None and session.outbox.latest_preview.step == 50
        assert session.has_pending_output
        socket.unblock.set()
        await wait_for(lambda: session.ctx.metrics.previews_sent == 1)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        return session, socket

    session, socket = run_async(scenario())
    texts = [json.loads(m) for m in socket.sent if isinstance(m, str)]
    frames = [decode_frame(m) for m in socket.sent if isinstance(m, bytes)]
    for message in texts:
        validate_server_message(message)
    assert [m["type"] for m in texts[:3]] == ["hello", "ack", "queue"]
    assert [m["step"] for m in texts if m["type"] == "progress"] == list(range(0, 51))
    assert [m["seq"] for m in texts] == list(range(1, len(texts) + 1))
    assert len(frames) == 1 and frames[0][0] == FRAME_PREVIEW and frames[0][1]["step"] == 50


def test_outbox_overflow_closes_the_session_with_1008(tmp_path):
    async def scenario() -> StuckSocket:
        session, socket = make_session(tmp_path, ServerLimits(outbox_max_messages=5))
        running = asyncio.create_task(session.run())
        for i in range(10):  # pings answered with pongs while the writer is stuck on the hello
            socket.client_sends({"type": "ping", "id": i})
        await wait_for(lambda: session.outbox.overflowed)
        socket.unblock.set()
        await asyncio.wait_for(running, 5)
        return socket

    socket = run_async(scenario())
    assert socket.closed_with is not None
    code, reason = socket.closed_with
    assert code == 1008 and "outbox overflow" in reason


def test_token_bucket():
    now = [0.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [None, None, None]
    assert bucket.take() == 0.5
    now[0] += 0.5
    assert bucket.take() is None and bucket.take() is not None


def test_previews_are_encoded_once_per_size():
    from hooocus_ws.previews import PreviewEncoder

    encoder = PreviewEncoder()
    preview = Preview(job_id="j", seq=3, step=1, rgb=np.zeros((300, 200, 3), dtype=np.uint8))
    small, large = PreviewSettings(max_side=64), PreviewSettings(max_side=256)
    first = encoder.encode_sync(preview, small)
    assert encoder.encode_sync(preview, small) is first  # a second connection with the same settings
    _, width, height, mime = encoder.encode_sync(preview, large)
    assert (first[1], first[2]) == (43, 64) and (width, height) == (171, 256) and mime == "image/jpeg"
    assert encoder.encoded == 2
