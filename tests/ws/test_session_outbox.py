"""The per-connection outbox (matrix row 24 in isolation): previews coalesce in one slot while the
socket is stuck, progress is never dropped, and an outbox past its bound closes the connection."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from starlette.websockets import WebSocketState

from engine.core.access import TokenStore
from engine.core.events import Preview, Progress
from engine.core.jobs import Job
from engine.core.request import GenerationRequest
from hooocus_ws.auth import AuthGate
from hooocus_ws.context import ServerContext, ServerLimits
from hooocus_ws.protocol import FRAME_PREVIEW, PreviewSettings, decode_frame
from hooocus_ws.session import Session, TokenBucket
from hooocus_ws.signing import UrlSigner
from tests.ws.conftest import ALICE, TOKENS_TEXT, make_runtime, run_async


class StuckSocket:
    """A websocket whose sends block until ``unblock`` is set: a client that stopped reading."""

    application_state = WebSocketState.CONNECTED

    def __init__(self) -> None:
        self.unblock = asyncio.Event()
        self.sent: list[str | bytes] = []

    async def send_text(self, text: str) -> None:
        await self.unblock.wait()
        self.sent.append(text)

    async def send_bytes(self, data: bytes) -> None:
        await self.unblock.wait()
        self.sent.append(data)


def make_session(tmp_path: Path, limits: ServerLimits) -> tuple[Session, StuckSocket]:
    tokens = TokenStore.parse(TOKENS_TEXT)
    ctx = ServerContext(runtime=make_runtime(tmp_path), gate=AuthGate(tokens), limits=limits, signer=UrlSigner(),
                        default_preview=PreviewSettings(min_interval_ms=0))
    socket = StuckSocket()
    session = Session(socket, ctx, tokens.verify(ALICE))  # type: ignore[arg-type]
    return session, socket


def test_slow_reader_gets_only_the_latest_preview_and_every_progress(tmp_path):
    async def scenario() -> tuple[Session, StuckSocket]:
        session, socket = make_session(tmp_path, ServerLimits())
        job = Job("j_1", GenerationRequest(), "alice")
        writer = asyncio.create_task(session._write_loop())
        session._subscribe_job(job, after_seq=None)
        job.emit(Progress(job_id="", step=0, total_steps=50))  # the writer takes it and gets stuck
        await asyncio.sleep(0.01)
        for step in range(1, 51):  # the worker keeps going at full speed
            job.emit(Progress(job_id="", step=step, total_steps=50))
            job.emit(Preview(job_id="", step=step, rgb=np.full((32, 32, 3), step, dtype=np.uint8)))
        await asyncio.sleep(0.01)
        assert session._preview_slot is not None and session._preview_slot.step == 50
        assert session.ctx.metrics.previews_dropped == 49
        assert len(session._fifo) == 50
        socket.unblock.set()
        for _ in range(100):
            await asyncio.sleep(0.005)
            if session.ctx.metrics.previews_sent:
                break
        writer.cancel()
        return session, socket

    session, socket = run_async(scenario())
    texts = [json.loads(m) for m in socket.sent if isinstance(m, str)]
    frames = [decode_frame(m) for m in socket.sent if isinstance(m, bytes)]
    assert [m["step"] for m in texts] == list(range(0, 51))
    assert [m["seq"] for m in texts] == list(range(1, 52))
    assert len(frames) == 1 and frames[0][0] == FRAME_PREVIEW and frames[0][1]["step"] == 50


def test_outbox_overflow_closes_with_1008(tmp_path):
    async def scenario() -> tuple[int, str] | None:
        session, _ = make_session(tmp_path, ServerLimits(outbox_max_messages=5))
        writer = asyncio.create_task(session._write_loop())
        for i in range(10):
            session._push({"type": "pong", "re": i})
        return await asyncio.wait_for(writer, 5)

    code, reason = run_async(scenario())
    assert code == 1008 and "slow" in reason


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
