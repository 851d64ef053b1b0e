"""Python client for ``hooocus.v1``: an async client and a thin sync wrapper.

    async with await HooocusClient.connect("ws://127.0.0.1:8188/v1/ws", token) as client:
        stream = await client.generate({"prompt": "a red fox in snow"},
                                       on_event=lambda e: print(e["type"]))  # or a callback
        async for event in stream:          # dicts: started, progress, image (with "data"), done ...
            ...
        result = await stream.result()      # JobResult: images with bytes, seeds, sha256
        result.save("outputs")              # dated folders, as Fooocus lays them out

After a dropped connection nothing is lost: connect again and ``await client.resume(stream)``
(= ``subscribe(job_id, after_seq=stream.last_job_seq)``); the server replays what was missed.

Scripts without asyncio use :class:`SyncHooocusClient` (same methods, blocking; what
``hooocus generate --server URL`` uses) or the one-call :func:`generate_images_sync`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from engine.core.errors import HooocusError, JobCancelled
from engine.core.events import ImageReady
from engine.core.outputs import write_image
from hooocus_ws.protocol import (
    FRAME_IMAGE,
    FRAME_PREVIEW,
    FRAME_UPLOAD,
    PROTOCOL,
    ProtocolError,
    decode_frame,
    encode_frame,
)

T = TypeVar("T")
_TERMINAL = frozenset({"done", "cancelled", "error"})
#: JSON around the base64 of an ``upload`` message ({"type":"upload","data":"…","id":"r123"}), with room to spare.
_UPLOAD_MESSAGE_OVERHEAD_BYTES = 128
log = logging.getLogger("hooocus.client")


@dataclass(frozen=True)
class ClientImage:
    index: int
    seed: int
    sha256: str
    width: int
    height: int
    mime: str
    data: bytes = field(repr=False)
    url: str | None = None

    def to_event(self, job_id: str = "") -> ImageReady:
        """As the engine's :class:`~engine.core.events.ImageReady` (what ``engine.core.outputs`` writes)."""
        return ImageReady(job_id=job_id, index=self.index, seed=self.seed, data=self.data, mime=self.mime,
                          width=self.width, height=self.height, sha256=self.sha256)

    def save(self, out_dir: str | Path) -> Path:
        """Write into ``out_dir/YYYY-MM-DD/`` (atomically); returns the file's path."""
        return write_image(Path(out_dir), self.to_event())


@dataclass(frozen=True)
class PreviewImage:
    index: int
    step: int
    mime: str
    width: int
    height: int
    data: bytes = field(repr=False)


@dataclass
class JobResult:
    job_id: str
    state: str  # done | cancelled | failed
    images: list[ClientImage]
    seeds: list[int]
    params: dict[str, Any]

    def __iter__(self) -> Iterator[ClientImage]:
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write every image into ``out_dir/YYYY-MM-DD/``; returns the paths in image order."""
        return [image.save(out_dir) for image in self.images]


EventCallback = Callable[[dict[str, Any]], None]
PreviewCallback = Callable[[PreviewImage], None]
_Callbacks = tuple[EventCallback | None, PreviewCallback | None]


def _call_safely(callback: Callable[[Any], None], value: Any) -> None:
    try:
        callback(value)
    except Exception:
        log.exception("a client callback failed")


class ConnectionLost(HooocusError):
    """The websocket closed; jobs go on on the server. Reconnect and ``resume`` the stream."""

    code = "connection_lost"


def _refusal(status: int, body: bytes | None) -> HooocusError:
    try:
        error = json.loads(body or b"")["error"]
        return HooocusError(str(error["message"]), code=str(error["code"]))
    except (ValueError, KeyError, TypeError):
        return HooocusError(f"the server refused the connection (HTTP {status})",
                            code="unauthorized" if status == 401 else "connection_lost")


class JobStream:
    """Events of one job as the server sends them, starting with ``accepted`` (after generate).
    Async-iterate for events; ``await result()``."""

    def __init__(self, job_id: str, *, position: int = 0, duplicate: bool = False) -> None:
        self.job_id = job_id
        self.position = position
        self.duplicate = duplicate
        self.last_job_seq = 0
        self.state = "queued"
        self.params: dict[str, Any] = {}
        self.seeds: list[int] = []
        self.images: dict[int, ClientImage] = {}
        self.latest_preview: PreviewImage | None = None
        #: Called (on the client's event loop) with each new event dict / each preview. An exception
        #: from a callback is logged and does not stop the stream.
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self.on_preview: Callable[[PreviewImage], None] | None = None
        self._events: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._result: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._result.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)  # no "never retrieved"

    # -- fed by the client's reader ------------------------------------------------------------------

    def _feed(self, event: dict[str, Any]) -> None:
        job_seq = event.get("job_seq")
        if isinstance(job_seq, int):
            if job_seq <= self.last_job_seq:
                return  # a replayed event this stream already has
            self.last_job_seq = job_seq
        kind = event["type"]
        if kind == "started":
            self.state = "running"
            self.params = event.get("params", {})
            self.seeds = [int(s) for s in event.get("seeds", [])]
        elif kind == "queue":
            self.position = event["position"]
        elif kind == "image":
            self.images[event["index"]] = ClientImage(
                index=event["index"], seed=int(event["seed"]), sha256=event["sha256"], width=event["width"],
                height=event["height"], mime=event["mime"], data=event.get("data", b""), url=event.get("url"))
        self._events.put_nowait(event)
        if self.on_event is not None:
            _call_safely(self.on_event, event)
        if kind in _TERMINAL and not self._result.done():
            self._finish(event)

    def _finish(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        images = [self.images[i] for i in sorted(self.images)]
        if kind == "done":
            self.state = "done"
            self._result.set_result(JobResult(self.job_id, "done", images, self.seeds, self.params))
        elif kind == "cancelled":
            self.state = "cancelled"
            exc = JobCancelled(event.get("reason", "user"))
            exc.partial = JobResult(self.job_id, "cancelled", images, self.seeds, self.params)  # type: ignore[attr-defined]
            self._result.set_exception(exc)
        else:
            self.state = "failed"
            self._result.set_exception(HooocusError(event.get("message", "the job failed"),
                                                    code=event.get("code", "internal_error"),
                                                    details={"job_id": self.job_id, "error_id": event.get("error_id")}))

    def _preview(self, preview: PreviewImage) -> None:
        self.latest_preview = preview
        if self.on_preview is not None:
            _call_safely(self.on_preview, preview)

    def _lost(self, exc: BaseException) -> None:
        if not self._result.done():
            self._result.set_exception(exc)
            self._events.put_nowait(exc)

    # -- public --------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._result.done()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            if self._result.done() and self._events.empty():
                return
            item = await self._events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item["type"] in _TERMINAL:
                return

    async def result(self, timeout_s: float | None = None) -> JobResult:
        """The finished job. Raises HooocusError (failed), JobCancelled (``.partial`` has what was
        done), ConnectionLost, or TimeoutError."""
        return await asyncio.wait_for(asyncio.shield(self._result), timeout_s)


class HooocusClient:
    def __init__(self, ws: ClientConnection, hello: dict[str, Any], *, timeout_s: float) -> None:
        self._ws = ws
        self.hello = hello
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._streams: dict[str, JobStream] = {}
        self._pending_image: dict[tuple[str, int], dict[str, Any]] = {}
        self._callbacks: dict[str, _Callbacks] = {}
        self._closed_exc: BaseException | None = None
        self._reader = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, url: str, token: str, *, timeout_s: float = 30.0, max_size: int | None = 64 * 2**20,
                      header_auth: bool = True) -> HooocusClient:
        """Open ``url`` (``ws://host:port/v1/ws``) with ``token`` (Authorization header, or the
        subprotocol when ``header_auth`` is False) and wait for the server's hello."""
        subprotocols = [PROTOCOL] if header_auth else [PROTOCOL, "hooocus.token." + token]
        headers = {"Authorization": f"Bearer {token}"} if header_auth else None
        try:
            ws = await connect(url, additional_headers=headers, subprotocols=subprotocols,  # type: ignore[arg-type]
                               compression=None, max_size=max_size, open_timeout=timeout_s,
                               close_timeout=min(timeout_s, 10.0))
        except InvalidStatus as exc:  # the server refused the handshake: its JSON error, its code
            raise _refusal(exc.response.status_code, exc.response.body) from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectionLost(f"cannot connect to {url}: {exc or type(exc).__name__}") from None
        try:
            hello = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
        except BaseException:
            await ws.close()
            raise
        if hello.get("type") != "hello":
            await ws.close()
            raise ProtocolError(f"expected hello, got {hello.get('type')!r}")
        return cls(ws, hello, timeout_s=timeout_s)

    async def __aenter__(self) -> HooocusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests ------------------------------------------------------------------------------------

    async def _request(self, message: dict[str, Any], timeout_s: float | None = None, *,
                       callbacks: _Callbacks | None = None, upload: bytes | None = None) -> dict[str, Any]:
        """Send ``message`` (or, with ``upload``, a binary upload frame whose header carries the id)
        and wait for the reply that names it (``re``)."""
        if self._closed_exc is not None:
            raise ConnectionLost("the connection is closed")
        request_id = f"r{next(self._ids)}"
        payload: str | bytes = (json.dumps({**message, "id": request_id}) if upload is None
                                else encode_frame(FRAME_UPLOAD, {"id": request_id}, upload))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if callbacks is not None:
            self._callbacks[request_id] = callbacks
        timeout_s = timeout_s or self.timeout_s
        try:
            await asyncio.wait_for(self._ws.send(payload), timeout_s)
            reply = await asyncio.wait_for(future, timeout_s)
        except ConnectionClosed as exc:
            raise ConnectionLost(f"the connection closed ({exc})") from None
        finally:
            self._pending.pop(request_id, None)
            self._callbacks.pop(request_id, None)
        if reply["type"] == "error":
            raise HooocusError(reply.get("message", "error"), code=reply.get("code", "internal_error"),
                               loc=tuple(reply["loc"]) if reply.get("loc") is not None else None,
                               details=reply.get("details"))
        return reply

    async def generate(self, params: dict[str, Any], *, request_id: str | None = None,
                       cancel_on_disconnect: bool = False, on_event: EventCallback | None = None,
                       on_preview: PreviewCallback | None = None) -> JobStream:
        """Queue a job; returns its stream once the server has accepted it (HooocusError otherwise).
        ``on_event`` / ``on_preview`` are called on this client's event loop for every event
        (from ``accepted`` on) / every preview, as an alternative to iterating the stream."""
        message: dict[str, Any] = {"type": "generate", "params": params}
        if request_id is not None:
            message["request_id"] = request_id
        if cancel_on_disconnect:
            message["cancel_on_disconnect"] = True
        # The stream must exist before the job's first event can arrive: the reader creates it
        # (with the callbacks) from the `accepted` reply, which the server sends before the job's events.
        reply = await self._request(message, callbacks=(on_event, on_preview))
        return reply["_stream"]

    async def upload(self, data: bytes, timeout_s: float | None = None) -> str:
        """Upload an input image (the file's bytes); returns its sha256, kept on the server for this
        token's principal: pass ``"sha256:<it>"`` as ``input_image``/``inpaint_mask``. Small files
        go as an ``upload`` message, larger ones as a binary upload frame (the text frame cap,
        ``hello.limits.max_message_bytes``, would refuse them)."""
        text = base64.b64encode(data).decode("ascii")
        limit = int((self.hello.get("limits") or {}).get("max_message_bytes") or 0)
        if len(text) + _UPLOAD_MESSAGE_OVERHEAD_BYTES <= limit:
            reply = await self._request({"type": "upload", "data": text}, timeout_s)
        else:
            reply = await self._request({}, timeout_s, upload=data)
        return str(reply["sha256"])

    async def cancel(self, job_id: str) -> str:
        """Ask to cancel; returns the job's state when the request arrived."""
        reply = await self._request({"type": "cancel", "job_id": job_id})
        return str(reply.get("state"))

    async def interrupt(self, job_id: str | None = None) -> str | None:
        """Admin: stop ``job_id`` if it is running, else every running job; the first stopped id."""
        reply = await self._request({"type": "interrupt"} if job_id is None else {"type": "interrupt", "job_id": job_id})
        return reply.get("job_id")

    async def subscribe(self, job_id: str, after_seq: int = 0, *, on_event: EventCallback | None = None,
                        on_preview: PreviewCallback | None = None) -> JobStream:
        """Attach to a job (e.g. from another process, or after a restart of this one); the server
        replays its events with job_seq > ``after_seq``, then follows it live."""
        stream = self._streams.get(job_id)
        if stream is None or stream.finished:
            stream = JobStream(job_id)
            stream.last_job_seq = after_seq
            self._streams[job_id] = stream
        stream.on_event = on_event or stream.on_event
        stream.on_preview = on_preview or stream.on_preview
        await self._request({"type": "subscribe", "job_id": job_id, "after_seq": after_seq})
        return stream

    async def resume(self, old: JobStream) -> JobStream:
        """Continue ``old`` (from a lost connection) on this one, without losing or doubling events.
        The callbacks of ``old`` carry over."""
        stream = JobStream(old.job_id, position=old.position)
        stream.last_job_seq = old.last_job_seq
        stream.params, stream.seeds, stream.images = old.params, old.seeds, dict(old.images)
        stream.state = old.state
        stream.on_event, stream.on_preview = old.on_event, old.on_preview
        self._streams[old.job_id] = stream
        await self._request({"type": "subscribe", "job_id": old.job_id, "after_seq": old.last_job_seq})
        return stream

    async def set_preview(self, **settings: Any) -> None:
        await self._request({"type": "set_preview", **settings})

    async def ping(self) -> None:
        await self._request({"type": "ping"})

    async def close(self) -> None:
        await self._ws.close()
        try:
            await asyncio.wait_for(self._reader, self.timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            self._reader.cancel()

    # -- reading -------------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            async for raw in self._ws:
                if isinstance(raw, bytes):
                    self._on_frame(raw)
                else:
                    self._on_message(json.loads(raw))
            exc: BaseException = ConnectionLost("the server closed the connection")
        except ConnectionClosed as closed:
            exc = ConnectionLost(f"the connection closed ({closed})")
        except Exception as other:  # a protocol bug on either side: fail loudly to every waiter
            exc = ConnectionLost(f"client reader failed: {other!r}")
        self._closed_exc = exc
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        for stream in self._streams.values():
            stream._lost(exc)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        re = message.get("re")
        if kind == "accepted":
            job_id = message["job_id"]
            if job_id not in self._streams or self._streams[job_id].finished:
                self._streams[job_id] = JobStream(job_id, position=message.get("position", 0),
                                                  duplicate=message.get("duplicate", False))
            on_event, on_preview = self._callbacks.pop(re, (None, None)) if re is not None else (None, None)
            if on_event is not None or on_preview is not None:
                self._streams[job_id].on_event = on_event
                self._streams[job_id].on_preview = on_preview
            # The stream's first event names the job even while it waits in the queue.
            self._streams[job_id]._feed(message)
            # Hand the stream itself to generate(): a fast job may finish (and leave _streams)
            # before generate() resumes.
            message = {**message, "_stream": self._streams[job_id]}
        if re is not None and re in self._pending:
            future = self._pending[re]
            if not future.done():
                future.set_result(message)
            if kind != "error" or message.get("job_id") is None:
                return
        job_id = message.get("job_id")
        stream = self._streams.get(job_id) if job_id else None
        if stream is None or kind in ("accepted", "ack"):
            return
        if kind == "image":
            # The bytes follow in the next binary frame; deliver the event with them.
            self._pending_image[(job_id, message["index"])] = message
            return
        self._feed(stream, message)

    def _feed(self, stream: JobStream, message: dict[str, Any]) -> None:
        stream._feed(message)
        if stream.finished and self._streams.get(stream.job_id) is stream:
            del self._streams[stream.job_id]  # a long-lived client must not keep every finished job's images

    def _on_frame(self, frame: bytes) -> None:
        kind, header, payload = decode_frame(frame)
        job_id = header.get("job_id")
        stream = self._streams.get(job_id) if isinstance(job_id, str) else None
        if kind == FRAME_IMAGE:
            message = self._pending_image.pop((job_id, header.get("index")), None)  # type: ignore[arg-type]
            if message is not None and stream is not None:
                self._feed(stream, {**message, "data": payload})
        elif kind == FRAME_PREVIEW and stream is not None:
            stream._preview(PreviewImage(index=header["index"], step=header.get("step", 0), mime=header["mime"],
                                         width=header["width"], height=header["height"], data=payload))


class SyncJobStream:
    def __init__(self, client: SyncHooocusClient, stream: JobStream) -> None:
        self._client = client
        self._stream = stream

    @property
    def job_id(self) -> str:
        return self._stream.job_id

    @property
    def last_job_seq(self) -> int:
        return self._stream.last_job_seq

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterator = self._stream.__aiter__()

        async def next_event() -> dict[str, Any]:
            return await iterator.__anext__()

        while True:
            try:
                yield self._client._run(next_event())
            except StopAsyncIteration:
                return

    def result(self, timeout_s: float | None = None) -> JobResult:
        return self._client._run(self._stream.result(timeout_s))


class SyncHooocusClient:
    """The async client on a private event loop thread, for scripts and the CLI."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hooocus-client", daemon=True)
        self._thread.start()
        try:
            self._client: HooocusClient = self._run(HooocusClient.connect(url, token, timeout_s=timeout_s))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Any, timeout_s: float | None = None) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout_s)

    def generate(self, params: dict[str, Any], *, request_id: str | None = None,
                 on_event: EventCallback | None = None, on_preview: PreviewCallback | None = None) -> SyncJobStream:
        """As :meth:`HooocusClient.generate`; the callbacks run on the client's private loop thread."""
        return SyncJobStream(self, self._run(self._client.generate(params, request_id=request_id, on_event=on_event,
                                                                   on_preview=on_preview)))

    def upload(self, data: bytes) -> str:
        """As :meth:`HooocusClient.upload`: the image's sha256."""
        return str(self._run(self._client.upload(data)))

    def cancel(self, job_id: str) -> str:
        return str(self._run(self._client.cancel(job_id)))

    def subscribe(self, job_id: str, after_seq: int = 0, *, on_event: EventCallback | None = None) -> SyncJobStream:
        return SyncJobStream(self, self._run(self._client.subscribe(job_id, after_seq, on_event=on_event)))

    def resume(self, old: SyncJobStream) -> SyncJobStream:
        """Continue a stream of a lost connection (another client) on this one."""
        return SyncJobStream(self, self._run(self._client.resume(old._stream)))

    def close(self) -> None:
        try:
            self._run(self._client.close(), timeout_s=self.timeout_s)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=self.timeout_s)
        self._loop.close()

    def __enter__(self) -> SyncHooocusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate_images_sync(url: str, token: str, params: dict[str, Any], *, timeout_s: float = 3600.0,
                         on_event: EventCallback | None = None, uploads: Sequence[bytes] = ()) -> list[ImageReady]:
    """Generate on a running ``hooocus serve`` and wait: the finished images (bytes included), as
    :class:`~engine.core.events.ImageReady`. ``uploads`` (input image files that ``params`` names
    by ``sha256:`` reference) are uploaded first, on the same connection. Raises HooocusError (the
    job failed, or the request was refused), JobCancelled, ConnectionLost or TimeoutError (after
    ``timeout_s``, the job is cancelled)."""
    with SyncHooocusClient(url, token, timeout_s=min(timeout_s, 30.0)) as client:
        for data in uploads:
            client.upload(data)
        stream = client.generate(params, on_event=on_event)
        try:
            result = stream.result(timeout_s=timeout_s)
        except TimeoutError:
            with contextlib.suppress(HooocusError, TimeoutError):
                client.cancel(stream.job_id)
            raise
    return [image.to_event(result.job_id) for image in result.images]
