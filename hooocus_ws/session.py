"""One websocket connection: a reader, a writer, a bounded outbox and the jobs it follows.

Threading (house style A9.3 #9): engine listeners run on the GPU worker thread and only
``loop.call_soon_threadsafe`` into :meth:`Session._on_event`; everything else here runs on the
event loop. The worker never waits for a client.

Job events become messages through ``Event.to_wire()`` (engine.core.events: the one mapping to the
protocol's names). They wait in the connection's :class:`~hooocus_ws.outbox.Outbox`: never-dropped
messages in a bounded FIFO, previews in a latest-wins slot. If the FIFO grows past its bound the
client is hopelessly behind: the connection is closed with 1008 and the jobs go on (they belong to
the principal; ``subscribe`` re-attaches).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import anyio
from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from engine.core.access import Principal, may_generate, may_interrupt
from engine.core.errors import Forbidden, HooocusError, InvalidImage
from engine.core.events import TERMINAL_EVENTS, Event, ImageReady, Preview, Queued
from engine.core.jobs import Job
from engine.core.logging_setup import log_context
from hooocus_ws import describe, service
from hooocus_ws.context import ServerContext
from hooocus_ws.outbox import Outbox
from hooocus_ws.protocol import (
    FRAME_IMAGE,
    FRAME_PREVIEW,
    FRAME_UPLOAD,
    PROTOCOL,
    CancelMessage,
    ClientMessage,
    DescribeMessage,
    GenerateMessage,
    InterruptMessage,
    PingMessage,
    ProtocolError,
    SetPreviewMessage,
    SubscribeMessage,
    UnsubscribeMessage,
    UploadFrameHeader,
    UploadMessage,
    decode_frame,
    encode_frame,
    message_id,
    parse_client_message,
    upload_frame_cap,
)

log = logging.getLogger("hooocus.ws")

_conn_ids = itertools.count(1)


class TokenBucket:
    """``rate_per_s`` sustained, ``burst`` at once. ``clock`` injectable for tests."""

    def __init__(self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self) -> float | None:
        """None if a token was available, else the seconds until one will be."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate_per_s)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return (1.0 - self._tokens) / self.rate_per_s


class Session:
    def __init__(self, websocket: WebSocket, ctx: ServerContext, principal: Principal) -> None:
        self.ws = websocket
        self.ctx = ctx
        self.principal = principal
        self.conn_id = f"c{next(_conn_ids)}"
        self.preview = ctx.default_preview
        self._loop = asyncio.get_running_loop()
        self.outbox = Outbox(max_messages=ctx.limits.outbox_max_messages, max_bytes=ctx.limits.outbox_max_bytes)
        self._subs: dict[str, tuple[int, Callable[[], None]]] = {}
        self._sub_tokens = itertools.count(1)
        self._cancel_on_disconnect: set[str] = set()
        self._last_position: dict[str, int] = {}
        self._bucket = TokenBucket(ctx.limits.messages_per_s, ctx.limits.message_burst)
        self._errors_in_a_row = 0
        self._closed = False
        #: This connection's describes: id -> (DescribeTask, the task that sends the answer).
        self._describes: dict[str, tuple[Any, asyncio.Task[None]]] = {}

    @property
    def has_pending_output(self) -> bool:
        """True while never-dropped messages wait in the outbox or are being written."""
        return self.outbox.has_pending_output

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the (already accepted) connection until either side ends it."""
        # Every record this connection logs (its tasks inherit the context) names the principal.
        with log_context(principal=self.principal.name):
            await self._run()

    async def _run(self) -> None:
        metrics = self.ctx.metrics
        metrics.ws_connections += 1
        metrics.ws_connections_total += 1
        limits = self.ctx.limits
        engine = self.ctx.runtime.engine
        self._push({"type": "hello", "protocol": PROTOCOL, "principal": self.principal.name,
                    "scopes": sorted(self.principal.scopes),
                    "limits": {"max_message_bytes": limits.max_message_bytes, "max_queue": engine.max_queue,
                               "max_queued_per_principal": engine.max_queued_per_owner,
                               "messages_per_s": limits.messages_per_s,
                               "event_retention_s": limits.event_retention_s},
                    "preview": self.preview.model_dump()})
        close: tuple[int, str] | None = None
        self.ctx.sessions.add(self)
        try:
            async with anyio.create_task_group() as tasks:

                async def read() -> None:
                    nonlocal close
                    wanted = await self._read_loop()
                    if wanted is not None:
                        # Let the writer flush what is queued (e.g. the error that explains the close);
                        # it ends the group itself once the outbox is empty.
                        close = wanted
                        self.outbox.close_when_empty()
                        await anyio.sleep(limits.close_timeout_s)
                    tasks.cancel_scope.cancel()

                async def write() -> None:
                    nonlocal close
                    wanted = await self._write_loop()
                    close = close or wanted
                    tasks.cancel_scope.cancel()

                tasks.start_soon(read, name=f"ws-reader-{self.conn_id}")
                tasks.start_soon(write, name=f"ws-writer-{self.conn_id}")
        finally:
            self._closed = True
            self.ctx.sessions.discard(self)
            self._detach_all()
            metrics.ws_connections -= 1
        if close is not None and self.ws.application_state == WebSocketState.CONNECTED:
            with anyio.move_on_after(limits.close_timeout_s):
                try:
                    await self.ws.close(code=close[0], reason=close[1])
                except (RuntimeError, OSError, WebSocketDisconnect):
                    pass

    def _detach_all(self) -> None:
        describe.cancel_all(self)
        for job_id in list(self._subs):
            self._unsubscribe(job_id)
        engine = self.ctx.runtime.engine
        for job_id in self._cancel_on_disconnect:
            engine.cancel(job_id, reason="disconnect")
        self._cancel_on_disconnect.clear()

    # -- reading ---------------------------------------------------------------------------------

    async def _read_loop(self) -> tuple[int, str] | None:
        """Handle client messages; returns the close (code, reason) the server wants, or None
        when the client went away. Idle connections are policed by protocol pings (uvicorn)."""
        limits = self.ctx.limits
        metrics = self.ctx.metrics
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return None
            text = message.get("text")
            if text is None:
                close = self._read_binary(message.get("bytes") or b"")
                if close is not None:
                    return close
                if self._errors_in_a_row >= limits.max_consecutive_errors:
                    return 1008, "too many invalid messages in a row"
                continue
            if len(text) > limits.max_message_bytes or len(text.encode("utf-8")) > limits.max_message_bytes:
                metrics.ws_messages_rejected["message_too_big"] += 1
                return 1009, f"message larger than {limits.max_message_bytes} bytes"
            metrics.ws_messages_in += 1
            retry_after = self._bucket.take()
            if retry_after is not None:
                self._send_error(message_id(text), "rate_limited", "too many messages; slow down",
                                 retry_after_s=round(retry_after, 3))
            else:
                try:
                    parsed = parse_client_message(text)
                except ProtocolError as exc:
                    self._send_error(message_id(text), exc.code, exc.message, loc=exc.loc)
                else:
                    await self._dispatch(parsed)
            if self._errors_in_a_row >= limits.max_consecutive_errors:
                return 1008, "too many invalid messages in a row"

    def _read_binary(self, frame: bytes) -> tuple[int, str] | None:
        """A client binary frame: only uploads (kind 3, the server's frame layout). Frames over
        the upload cap close the connection (1009) like an oversized text frame."""
        cap = upload_frame_cap(self.ctx.runtime.settings.max_upload_bytes)
        if len(frame) > cap:
            self.ctx.metrics.ws_messages_rejected["message_too_big"] += 1
            return 1009, f"binary frame larger than {cap} bytes"
        self.ctx.metrics.ws_messages_in += 1
        retry_after = self._bucket.take()
        if retry_after is not None:
            self._send_error(None, "rate_limited", "too many messages; slow down", retry_after_s=round(retry_after, 3))
            return None
        re: Any = None
        try:
            kind, header, payload = decode_frame(frame)
            re = header.get("id") if isinstance(header.get("id"), str | int) else None
            if kind != FRAME_UPLOAD:
                raise ProtocolError(f"a client binary frame must be an upload (kind {FRAME_UPLOAD}), got kind {kind}")
            try:
                UploadFrameHeader.model_validate(header)
            except ValidationError as exc:
                raise ProtocolError(f"upload frame header: {exc.errors(include_url=False)[0]['msg']}") from None
            self._upload(re, payload, loc=("bytes",))
            self._errors_in_a_row = 0
        except HooocusError as exc:
            self._send_error(re, exc.code, exc.message, loc=exc.loc)
        return None

    def _upload(self, re: Any, data: bytes, *, loc: tuple[str | int, ...]) -> None:
        if not may_generate(self.principal):
            raise Forbidden("this token may not upload images (scope 'generate' missing)")
        uploads = self.ctx.runtime.uploads
        if uploads is None:
            raise HooocusError("this server does not take uploads", code="invalid_request")
        info = uploads.put(data, owner=self.principal.name, loc=loc)
        self._push({"type": "uploaded", "re": re, **info.to_dict()})

    def _upload_message(self, msg: UploadMessage) -> None:
        try:
            data = base64.b64decode(msg.data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImage("data is not valid base64", loc=("data",)) from None
        self._upload(msg.id, data, loc=("data",))

    async def _dispatch(self, msg: ClientMessage) -> None:
        try:
            if isinstance(msg, GenerateMessage):
                await self._generate(msg)
            elif isinstance(msg, CancelMessage):
                self._cancel(msg)
            elif isinstance(msg, SubscribeMessage):
                self._subscribe(msg)
            elif isinstance(msg, UnsubscribeMessage):
                known = msg.job_id in self._subs
                self._unsubscribe(msg.job_id)
                self._push({"type": "ack", "re": msg.id, "job_id": msg.job_id, "state": "unsubscribed" if known
                            else "not_subscribed"})
            elif isinstance(msg, SetPreviewMessage):
                changes = msg.model_dump(exclude={"type", "id"}, exclude_none=True)
                self.preview = self.preview.model_copy(update=changes)
                if not self.preview.enabled:
                    self.outbox.discard_previews()
                self._push({"type": "ack", "re": msg.id})
            elif isinstance(msg, InterruptMessage):
                if not may_interrupt(self.principal):
                    raise Forbidden("interrupt needs the 'admin' scope")
                stopped = self.ctx.runtime.engine.interrupt_running(msg.job_id, reason="admin")
                self._push({"type": "ack", "re": msg.id, "job_id": stopped[0] if stopped else None,
                            "job_ids": stopped})
            elif isinstance(msg, PingMessage):
                self._push({"type": "pong", "re": msg.id})
            elif isinstance(msg, UploadMessage):
                self._upload_message(msg)
            elif isinstance(msg, DescribeMessage):
                await describe.start(self, msg)
            self._errors_in_a_row = 0
        except HooocusError as exc:
            self._send_error(msg.id, exc.code, exc.message, loc=exc.loc, details=exc.details)
        except Exception:  # never a traceback to the client, never a dead connection
            error_id = secrets.token_hex(6)
            log.exception("ws message failed (conn %s, error_id %s)", self.conn_id, error_id)
            self._send_error(msg.id, "internal_error", f"internal error (error_id {error_id})", error_id=error_id)

    async def _generate(self, msg: GenerateMessage) -> None:
        params = dict(msg.params)
        request_id = msg.request_id
        if "request_id" in params:  # accepted inside params too, for clients that build one dict
            inner = params.pop("request_id")
            if request_id is not None and inner != request_id:
                raise ProtocolError("request_id given twice with different values", loc=("request_id",))
            request_id = inner
        try:
            # On a worker thread: the engine decodes input images at submit. This connection's
            # messages stay in order (the read loop awaits this); the others keep being served.
            job, position, duplicate = await service.submit_job_async(self.ctx, self.principal, params, request_id)
        except HooocusError as exc:
            if exc.loc is not None and exc.code != "forbidden":
                exc.loc = ("params", *exc.loc)
                if isinstance(exc.details, list):
                    exc.details = [{**d, "loc": ["params", *d.get("loc", [])]} if isinstance(d, dict) else d
                                   for d in exc.details]
            raise
        self._push({"type": "accepted", "re": msg.id, "job_id": job.job_id, "position": position,
                    "duplicate": duplicate})
        if msg.cancel_on_disconnect:
            self._cancel_on_disconnect.add(job.job_id)
        if job.job_id not in self._subs:
            self._last_position[job.job_id] = position
            self._subscribe_job(job, after_seq=0)

    def _cancel(self, msg: CancelMessage) -> None:
        if describe.cancel(self, msg):
            return
        job = service.check_cancel_allowed(self.ctx, self.principal, msg.job_id)
        # Follow the job first so this connection hears the resulting `cancelled` event.
        if job.job_id not in self._subs and not job.state.terminal:
            self._subscribe_job(job, after_seq=None)
        self._push({"type": "ack", "re": msg.id, "job_id": job.job_id, "state": job.state.value})
        service.cancel_job(self.ctx, job, reason="user")

    def _subscribe(self, msg: SubscribeMessage) -> None:
        job = service.visible_job(self.ctx, self.principal, msg.job_id)
        self._unsubscribe(job.job_id)
        self._last_position.pop(job.job_id, None)
        self._push({"type": "ack", "re": msg.id, "job_id": job.job_id, "state": job.state.value})
        token = self._subscribe_job(job, after_seq=msg.after_seq)
        preview = job.latest_preview
        if preview is not None and not job.state.terminal and preview.seq > msg.after_seq:
            # After the replay (call_soon keeps order), the newest preview, if the job is still running.
            self._loop.call_soon(self._on_event, token, preview)

    # -- job events --------------------------------------------------------------------------------

    def _subscribe_job(self, job: Job, *, after_seq: int | None) -> int:
        token = next(self._sub_tokens)
        loop = self._loop

        def listener(event: Event) -> None:  # worker thread (or the loop thread during replay)
            if self._closed:
                return
            try:
                loop.call_soon_threadsafe(self._on_event, token, event)
            except RuntimeError:  # the loop is closed: the connection is long gone
                pass

        # Replayed events only reach _on_event later (call_soon), when this entry is in place.
        self._subs[job.job_id] = (token, job.subscribe(listener, after_seq=after_seq))
        return token

    def _unsubscribe(self, job_id: str) -> None:
        entry = self._subs.pop(job_id, None)
        if entry is not None:
            entry[1]()
        self._last_position.pop(job_id, None)

    def _on_event(self, token: int, event: Event) -> None:
        """Turn one engine event into outbox entries (event loop thread)."""
        job_id = event.job_id
        entry = self._subs.get(job_id)
        if self._closed or entry is None or entry[0] != token:
            return  # a stale callback from an earlier subscription
        if isinstance(event, Preview):
            if self.preview.enabled and event.rgb is not None:
                if self.outbox.latest_preview is not None:
                    self.ctx.metrics.previews_dropped += 1  # the unsent one it replaces
                self.outbox.offer_preview(event)
            return
        if event.wire_type is None:
            return  # an event kind this protocol version does not send
        if isinstance(event, Queued):
            if self._last_position.get(job_id) == event.position:
                return
            self._last_position[job_id] = event.position
        message = event.to_wire()
        binary: bytes | None = None
        if isinstance(event, ImageReady):
            message["url"] = self.ctx.image_url(event.sha256, event.extension)
            binary = encode_frame(FRAME_IMAGE, event.frame_header(), event.data)
        self._push(message, binary)
        if isinstance(event, TERMINAL_EVENTS):
            self.outbox.discard_previews(job_id)
            self._cancel_on_disconnect.discard(job_id)
            self._unsubscribe(job_id)

    # -- writing -----------------------------------------------------------------------------------

    def _push(self, message: dict[str, Any], binary: bytes | None = None) -> None:
        was_overflowed = self.outbox.overflowed
        if not self.outbox.push(message, binary) and not was_overflowed:
            log.warning("outbox overflow on %s; closing the connection (the jobs go on)", self.conn_id)

    def _send_error(self, re: Any, code: str, message: str, **extra: Any) -> None:
        self._errors_in_a_row += 1
        self.ctx.metrics.ws_messages_rejected[code] += 1
        out: dict[str, Any] = {"type": "error", "re": re, "code": code, "message": message}
        for key, value in extra.items():
            if value is not None:
                out[key] = list(value) if key == "loc" else value
        self._push(out)

    async def _write_loop(self) -> tuple[int, str] | None:
        limits = self.ctx.limits

        async def send(message: dict[str, Any], binary: bytes | None) -> None:
            text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
            with anyio.fail_after(limits.send_timeout_s):
                await self.ws.send_text(text)
                if binary is not None:
                    await self.ws.send_bytes(binary)

        def preview_interval_s() -> float | None:
            return self.preview.min_interval_ms / 1000.0 if self.preview.enabled else None

        try:
            outcome = await self.outbox.flush(send, self._send_preview, preview_interval_s)
        except TimeoutError:
            log.warning("send timed out on %s; closing", self.conn_id)
            return 1008, "client too slow: send timed out"
        except (WebSocketDisconnect, OSError, RuntimeError):
            return None
        if outcome == "overflow":
            return 1008, "client too slow: outbox overflow; re-attach with subscribe"
        return None

    async def _send_preview(self, preview: Preview) -> None:
        settings = self.preview
        data, width, height, mime = await self.ctx.previews.encode(preview, settings)
        header = preview.frame_header(mime=mime, width=width, height=height)
        with anyio.fail_after(self.ctx.limits.send_timeout_s):
            await self.ws.send_bytes(encode_frame(FRAME_PREVIEW, header, data))
        self.ctx.metrics.previews_sent += 1
