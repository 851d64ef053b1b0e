"""``hooocus mcp --connect ws://…``: the tools forward to a running ``hooocus serve`` over its websocket,
so two processes never hold two copies of SDXL (api_anchors §11.3 "proxy" mode).

The websocket client (``hooocus_ws.client.HooocusClient``) is used through a small surface:
``await generate(params)`` gives a ``JobStream`` (``job_id``; async-iterates ``hooocus.v1`` event
dicts, whose ``image`` events carry the bytes), ``await cancel(job_id)``, ``await close()``; options
come from the same server's ``GET /v1/options``. This backend keeps a record of the jobs it started
(their events and images), which is what ``get_job`` and the image resources read: each one an
engine ``Job`` fed with the events ``Event.from_wire`` parses, so a remote job has the same states
and transitions as a local one. The token comes
from the environment and is only ever sent to that server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import numpy as np

from engine.core.access import Principal, may_read_image, may_view_job
from engine.core.constants import PERFORMANCE_NAMES, SAMPLER_NAMES, SCHEDULER_NAMES, SDXL_ASPECT_RATIOS
from engine.core.errors import HooocusError, NotFound
from engine.core.events import Event, Failed, ImageReady, Queued, Started
from engine.core.jobs import Job
from engine.core.request import GenerationRequest
from engine.core.store import ImageStore, StoredImage
from hooocus_mcp.backend import JobView, events_until_terminal, job_view

#: A remote describe on a CPU-only server can take a minute; the server cancels its own at 300 s.
DESCRIBE_TIMEOUT_S = 330.0

log = logging.getLogger("hooocus.mcp.remote")


def event_from_message(message: dict[str, Any]) -> Event | None:
    """A ``hooocus.v1`` server message as an engine event (None for messages that are not job events).

    ``Event.from_wire`` does the parsing; the one addition is ``accepted``, the reply to
    ``generate``, which opens a job's stream and carries its first queue position."""
    if message.get("type") == "accepted" and message.get("job_id"):
        return Queued(job_id=str(message["job_id"]), position=int(message.get("position") or 0))
    return Event.from_wire(message)


class _RemoteJob:
    """A job that runs on the server, mirrored here by an engine :class:`Job`: the events the server
    sends are replayed into it, so its state machine, bounded event log and fields (state, seeds,
    images, error, timestamps) are the engine's own, and :func:`hooocus_mcp.backend.job_view` reads
    it like a local job. Only the queue position, which the engine keeps outside the job, is kept here.
    Everything runs on the event loop (the job's lock is never contended)."""

    def __init__(self, job_id: str, request: GenerationRequest, owner: str) -> None:
        self.job = Job(job_id, request, owner)
        self.queue_position: int | None = 0
        self.job.subscribe(self._track_position, after_seq=None)

    def _track_position(self, event: Event) -> None:
        if isinstance(event, Queued):
            self.queue_position = event.position
        elif isinstance(event, Started) or self.job.state.terminal:
            self.queue_position = None

    @property
    def owner(self) -> str:
        return self.job.owner

    def record(self, event: Event) -> None:
        """Replay one server event into the mirror (it gets this job's own ``seq``)."""
        self.job.emit(event)


ClientFactory = Callable[[], Awaitable[Any]]
OptionsFetcher = Callable[[], Awaitable[dict[str, Any]]]


class RemoteBackend:
    """A :class:`hooocus_mcp.backend.Backend` over a websocket client to ``hooocus serve``."""

    def __init__(self, connect: ClientFactory, *, fetch_options: OptionsFetcher | None = None,
                 max_jobs: int = 256, post_describe: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None
                 ) -> None:
        self._connect = connect
        self._fetch_options = fetch_options
        self._post_describe = post_describe
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

        async def post_describe(params: dict[str, Any]) -> dict[str, Any]:
            import httpx

            # The server answers POST /v1/describe with {prompt, ...} or {"error": {code, message, loc}}.
            base = re.sub(r"^ws", "http", url.split("/v1/ws", 1)[0].rstrip("/"))
            async with httpx.AsyncClient(timeout=DESCRIBE_TIMEOUT_S) as http:
                response = await http.post(f"{base}/v1/describe", json=params,
                                           headers={"Authorization": f"Bearer {token}"})
            body = response.json()
            if response.status_code != 200:
                error = body.get("error", {}) if isinstance(body, dict) else {}
                loc = error.get("loc")
                raise HooocusError(error.get("message", f"HTTP {response.status_code}"),
                                   code=error.get("code", "internal_error"), loc=tuple(loc) if loc else None)
            return dict(body)

        return cls(connect, fetch_options=fetch_options, post_describe=post_describe)

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
        job = _RemoteJob(stream.job_id, request, caller.name)
        self._jobs[stream.job_id] = job
        for job_id in [j for j, old in self._jobs.items() if old.job.state.terminal]:
            if len(self._jobs) <= self.max_jobs:
                break
            del self._jobs[job_id]
        task = asyncio.get_running_loop().create_task(self._pump(job, stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stream.job_id

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
            log.warning("remote job %s: %s", job.job.job_id, exc)
        if not job.job.state.terminal:  # the stream ended without a terminal event
            job.record(Failed(job_id=job.job.job_id, code="connection_lost",
                              message="lost the connection to the server"))

    def _job(self, job_id: str, caller: Principal) -> _RemoteJob:
        job = self._jobs.get(job_id)
        if job is None or not may_view_job(caller, job.owner):
            raise NotFound(f"no job {job_id!r}; job ids come from generate_image")
        return job

    @contextlib.asynccontextmanager
    async def follow(self, job_id: str, caller: Principal) -> AsyncIterator[AsyncIterator[Event]]:
        job = self._job(job_id, caller).job
        queue: asyncio.Queue[Event] = asyncio.Queue()
        # Events are recorded on this loop, so the listener may put directly (replay first, then live).
        async with events_until_terminal(queue, job.subscribe(queue.put_nowait, after_seq=0)) as events:
            yield events

    async def job(self, job_id: str, caller: Principal) -> JobView:
        remote = self._job(job_id, caller)
        return job_view(remote.job, remote.queue_position)

    async def cancel(self, job_id: str, caller: Principal) -> bool:
        job = self._job(job_id, caller).job
        if job.state.terminal:
            return False
        await (await self._get_client()).cancel(job_id)
        return True

    async def describe(self, params: dict[str, Any], caller: Principal) -> dict[str, Any]:
        if self._post_describe is None:
            raise HooocusError("this engine connection cannot describe images", code="invalid_request")
        return await self._post_describe(params)

    async def image(self, sha256: str) -> StoredImage | None:
        return self._images.get(sha256)

    async def may_read_image(self, sha256: str, caller: Principal) -> bool:
        return may_read_image(caller, self._images.owners(sha256))

    async def preview(self, job_id: str, caller: Principal) -> np.ndarray | None:
        self._job(job_id, caller)
        return None  # previews are not forwarded in proxy mode
