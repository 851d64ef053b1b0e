"""``hooocus mcp --connect ws://…``: the tools forward to a running ``hooocus serve`` over its websocket,
so two processes never hold two copies of SDXL (api_anchors §11.3 "proxy" mode).

The websocket client (``hooocus_ws.client.HooocusClient``) is used through a small surface:
``await generate(params)`` gives a ``JobStream`` (``job_id``; async-iterates ``hooocus.v1`` event
dicts, whose ``image`` events carry the bytes), ``await cancel(job_id)``, ``await close()``; options
come from the same server's ``GET /v1/options``. This backend keeps a record of the jobs it started
(their events and images), which is what ``get_job`` and the image resources read. The token comes
from the environment and is only ever sent to that server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from engine.core.access import Principal, may_read_image, may_view_job
from engine.core.constants import PERFORMANCE_NAMES, SAMPLER_NAMES, SCHEDULER_NAMES, SDXL_ASPECT_RATIOS
from engine.core.errors import HooocusError, NotFound
from engine.core.events import (
    TERMINAL_EVENTS,
    Cancelled,
    Done,
    Event,
    Failed,
    ImageReady,
    Progress,
    Queued,
    Started,
    Warning_,
)
from engine.core.request import GenerationRequest
from engine.core.store import ImageStore, StoredImage
from hooocus_mcp.backend import ImageInfo, JobView, steps_done

log = logging.getLogger("hooocus.mcp.remote")


def event_from_message(message: dict[str, Any]) -> Event | None:
    """A ``hooocus.v1`` server message as an engine event (None for messages that are not job events)."""
    kind = str(message.get("type", ""))
    job_id = str(message.get("job_id") or "")
    if not job_id:
        return None
    if kind in ("accepted", "queue", "queued"):
        return Queued(job_id=job_id, position=int(message.get("position") or 0))
    if kind == "started":
        seeds = tuple(int(s) for s in message.get("seeds", ()))
        return Started(job_id=job_id, params=dict(message.get("params") or {}), seeds=seeds,
                       total_steps=int(message.get("total_steps") or 0))
    if kind == "progress":
        return Progress(job_id=job_id, step=int(message["step"]), total_steps=int(message["total_steps"]),
                        stage=str(message.get("stage", "sample")), image_index=int(message.get("image_index", 0)),
                        image_count=int(message.get("image_count", 1)))
    if kind == "image":
        data = message.get("data") if isinstance(message.get("data"), bytes | bytearray) else b""
        return ImageReady(job_id=job_id, index=int(message.get("index", 0)), seed=int(message.get("seed", 0)),
                          data=bytes(data), mime=str(message.get("mime", "image/png")),
                          width=int(message.get("width", 0)), height=int(message.get("height", 0)),
                          sha256=str(message.get("sha256", "")))
    if kind == "done":
        return Done(job_id=job_id, images_done=int(message.get("images_done", 0)))
    if kind == "cancelled":
        return Cancelled(job_id=job_id, images_done=int(message.get("images_done", 0)),
                         reason=str(message.get("reason", "user")))
    if kind in ("error", "failed"):
        return Failed(job_id=job_id, code=str(message.get("code", "internal_error")),
                      message=str(message.get("message", "")), error_id=str(message.get("error_id") or ""),
                      images_done=int(message.get("images_done") or 0))
    if kind == "warning":
        return Warning_(job_id=job_id, code=str(message.get("code", "")), message=str(message.get("message", "")))
    return None


@dataclass
class _RemoteJob:
    job_id: str
    owner: str
    events: list[Event] = field(default_factory=list)
    images: list[ImageReady] = field(default_factory=list)
    state: str = "queued"
    queue_position: int | None = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, Queued):
            self.queue_position = event.position
        elif isinstance(event, Started):
            self.state, self.started_at, self.queue_position = "running", time.time(), None
        elif isinstance(event, ImageReady) and event.data:
            self.images.append(event)
        elif isinstance(event, TERMINAL_EVENTS):
            self.state = {Done: "done", Cancelled: "cancelled", Failed: "failed"}[type(event)]
            self.finished_at = time.time()
        self.changed.set()
        self.changed = asyncio.Event()


ClientFactory = Callable[[], Awaitable[Any]]
OptionsFetcher = Callable[[], Awaitable[dict[str, Any]]]


class RemoteBackend:
    """A :class:`hooocus_mcp.backend.Backend` over a websocket client to ``hooocus serve``."""

    def __init__(self, connect: ClientFactory, *, fetch_options: OptionsFetcher | None = None,
                 max_jobs: int = 256) -> None:
        self._connect = connect
        self._fetch_options = fetch_options
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._jobs: dict[str, _RemoteJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._images = ImageStore(max_bytes=256 * 1024 * 1024)
        self.max_jobs = max_jobs

    @classmethod
    def for_url(cls, url: str, token: str, *, connect_client: Callable[..., Awaitable[Any]],
                timeout_s: float = 30.0) -> RemoteBackend:
        """``connect_client(url, token, timeout_s=...)`` opens the websocket client (the product CLI
        passes ``hooocus_ws.client.HooocusClient.connect``; this package does not import that door)."""

        async def connect() -> Any:
            return await connect_client(url, token, timeout_s=timeout_s)

        async def fetch_options() -> dict[str, Any]:
            import httpx

            # The websocket has no options message; the same server answers GET /v1/options.
            base = re.sub(r"^ws", "http", url.split("/v1/ws", 1)[0].rstrip("/"))
            async with httpx.AsyncClient(timeout=timeout_s) as http:
                response = await http.get(f"{base}/v1/options", headers={"Authorization": f"Bearer {token}"})
                response.raise_for_status()
                return dict(response.json())

        return cls(connect, fetch_options=fetch_options)

    async def _get_client(self) -> Any:
        async with self._lock:
            if self._client is None:
                try:
                    self._client = await self._connect()
                except HooocusError:
                    raise
                except Exception as exc:  # refused, timed out, bad handshake: say so in one line
                    raise HooocusError(f"cannot reach the hooocus server: {exc}", code="connection_lost") from None
            return self._client

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def options(self) -> dict[str, Any]:
        if self._fetch_options is not None:
            try:
                return await self._fetch_options()
            except Exception as exc:  # noqa: BLE001 - fall back to what is known without the server
                log.warning("could not fetch options from the server: %s", exc)
        # The fixed lists are still right; the server's model and style names are not known here.
        return {"models": [], "refiners": [], "loras": [], "styles": [], "samplers": list(SAMPLER_NAMES),
                "schedulers": list(SCHEDULER_NAMES), "aspect_ratios": list(SDXL_ASPECT_RATIOS),
                "performances": list(PERFORMANCE_NAMES), "defaults": GenerationRequest().model_dump(mode="json")}

    async def submit(self, request: GenerationRequest, caller: Principal) -> str:
        # Shielded: a caller that goes away while the server accepts the job must still learn its id,
        # or the cancel that follows could not reach it (the job would run for nobody).
        with anyio.CancelScope(shield=True):
            client = await self._get_client()
            try:  # HooocusError (invalid_request, unknown_style, queue_full ...) when the server refuses it
                stream = await client.generate(request.model_dump(mode="json", exclude_unset=True))
            except HooocusError as exc:
                if exc.code == "connection_lost":
                    self._client = None  # connect again on the next call
                raise
        job = _RemoteJob(job_id=stream.job_id, owner=caller.name)
        self._jobs[job.job_id] = job
        for job_id in [j for j, old in self._jobs.items() if old.state not in ("queued", "running")]:
            if len(self._jobs) <= self.max_jobs:
                break
            del self._jobs[job_id]
        task = asyncio.get_running_loop().create_task(self._pump(job, stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job.job_id

    async def _pump(self, job: _RemoteJob, stream: Any) -> None:
        """Record the job's events as they arrive (image events carry their bytes)."""
        try:
            async for message in stream:
                event = event_from_message(message)
                if event is None:
                    continue
                if isinstance(event, ImageReady) and event.data:
                    self._images.put(event, owner=job.owner)  # readable as a resource while the job goes on
                job.record(event)
        except Exception as exc:  # noqa: BLE001 - a broken stream ends the job, not the MCP server
            log.warning("remote job %s: %s", job.job_id, exc)
        if job.state in ("queued", "running"):  # the stream ended without a terminal event
            job.record(Failed(job_id=job.job_id, code="connection_lost", message="lost the connection to the server"))

    def _job(self, job_id: str, caller: Principal) -> _RemoteJob:
        job = self._jobs.get(job_id)
        if job is None or not may_view_job(caller, job.owner):
            raise NotFound(f"no job {job_id!r}; job ids come from generate_image")
        return job

    @contextlib.asynccontextmanager
    async def follow(self, job_id: str, caller: Principal) -> AsyncIterator[AsyncIterator[Event]]:
        job = self._job(job_id, caller)

        async def events() -> AsyncIterator[Event]:
            sent = 0
            while True:
                changed = job.changed
                while sent < len(job.events):
                    event = job.events[sent]
                    sent += 1
                    yield event
                    if isinstance(event, TERMINAL_EVENTS):
                        return
                await changed.wait()

        yield events()

    async def job(self, job_id: str, caller: Principal) -> JobView:
        job = self._job(job_id, caller)
        started = next((e for e in job.events if isinstance(e, Started)), None)
        progress = next((e for e in reversed(job.events) if isinstance(e, Progress)), None)
        failed = next((e for e in job.events if isinstance(e, Failed)), None)
        total = started.total_steps if started else 0
        done = total if job.state == "done" else (steps_done(progress) if progress else 0)
        images = tuple(ImageInfo(index=i.index, seed=str(i.seed), sha256=i.sha256, mime=i.mime, width=i.width,
                                 height=i.height, size_bytes=len(i.data)) for i in job.images)
        return JobView(job_id=job.job_id, state=job.state, queue_position=job.queue_position,
                       params=dict(started.params) if started else {},
                       seeds=tuple(str(s) for s in started.seeds) if started else (),
                       done_steps=min(done, total) if total else done, total_steps=total, images=images,
                       error=None if failed is None else {"code": failed.code, "message": failed.message,
                                                           "error_id": failed.error_id},
                       created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at)

    async def cancel(self, job_id: str, caller: Principal) -> bool:
        job = self._job(job_id, caller)
        if job.state not in ("queued", "running"):
            return False
        await (await self._get_client()).cancel(job_id)
        return True

    async def image(self, sha256: str) -> StoredImage | None:
        return self._images.get(sha256)

    async def may_read_image(self, sha256: str, caller: Principal) -> bool:
        return may_read_image(caller, self._images.owners(sha256))

    async def preview(self, job_id: str, caller: Principal) -> np.ndarray | None:
        self._job(job_id, caller)
        return None  # previews are not forwarded in proxy mode
