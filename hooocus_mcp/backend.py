"""What the MCP tools need from an engine, and the in-process implementation.

The tools talk to a :class:`Backend`, so they do not care whether the engine lives in this process
(:class:`LocalBackend`: the same engine and queue as the websocket front door) or in a running
``hooocus serve`` reached over the websocket (:class:`hooocus_mcp.remote.RemoteBackend`).

Engine listeners run on the GPU worker thread; :class:`LocalBackend` hands events to the event loop
with ``loop.call_soon_threadsafe`` and never blocks the worker. Async code here never calls torch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import numpy as np

from engine.core.access import Principal, may_cancel, may_generate, may_read_image, may_view_job
from engine.core.errors import Forbidden, InvalidRequest, NotFound
from engine.core.events import TERMINAL_EVENTS, Event, Preview, Progress, Started
from engine.core.jobs import Job
from engine.core.request import GenerationRequest
from engine.core.runtime import Runtime
from engine.core.store import StoredImage


@dataclass(frozen=True)
class ImageInfo:
    """One finished image, without its bytes."""

    index: int
    seed: str
    sha256: str
    mime: str
    width: int
    height: int
    size_bytes: int


@dataclass(frozen=True)
class JobView:
    """A JSON-friendly snapshot of one job, the same for every backend."""

    job_id: str
    state: str  # queued | running | done | cancelled | failed (engine.core.jobs.JobState values)
    queue_position: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[str, ...] = ()
    done_steps: int = 0
    total_steps: int = 0
    images: tuple[ImageInfo, ...] = ()
    error: dict[str, Any] | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")


def steps_done(progress: Progress) -> int:
    """Steps finished over all images of a job, from one progress event (images have equal steps)."""
    return progress.image_index * progress.total_steps + progress.step


class Backend(Protocol):
    """The engine as the MCP tools see it. ``caller`` owns the jobs it submits."""

    async def options(self) -> dict[str, Any]: ...

    async def submit(self, request: GenerationRequest, caller: Principal) -> str:
        """Queue a job; raise HooocusError (invalid_request, unknown_style, queue_full ...)."""

    def follow(self, job_id: str, caller: Principal) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Event]]:
        """The job's events from the start (replayed), then live, ending after the terminal event."""

    async def job(self, job_id: str, caller: Principal) -> JobView: ...

    async def cancel(self, job_id: str, caller: Principal) -> bool:
        """Cancel a queued or running job; False if it had already finished."""

    async def image(self, sha256: str) -> StoredImage | None: ...

    async def describe(self, params: dict[str, Any], caller: Principal) -> dict[str, Any]:
        """Describe an image (engine/describe): ``{image, mode}`` → ``{prompt, styles, mode, elapsed_s}``."""

    async def may_read_image(self, sha256: str, caller: Principal) -> bool:
        """Whether ``caller`` produced the image (or is admin): its PNG metadata holds the prompt."""

    async def preview(self, job_id: str, caller: Principal) -> np.ndarray | None:
        """The latest in-progress preview (uint8 RGB) or None."""


class LocalBackend:
    """The engine of this process (``Runtime``): one queue shared with the websocket front door.

    ``history`` (an :class:`engine.core.history.JobHistory`, optional) answers for jobs this engine does
    not know: ``hooocus mcp`` over stdio runs one process per host session (the MCP Inspector: one
    per call), so a job started by an earlier process is read back from the history.
    """

    def __init__(self, runtime: Runtime, *, history: Any = None) -> None:
        self.runtime = runtime
        self.history = history

    def _recorded(self, job_id: str, caller: Principal) -> dict[str, Any] | None:
        """The history's record of a job this engine does not run, if ``caller`` may see it."""
        if self.history is None or self.runtime.engine.get_job(job_id) is not None:
            return None
        record = self.history.get_job(job_id)
        if record is None or not may_view_job(caller, record["owner"]):
            return None
        return record

    async def options(self) -> dict[str, Any]:
        # The real runner may scan model folders: keep file IO off the event loop.
        return await anyio.to_thread.run_sync(self.runtime.engine.runner.options)

    async def submit(self, request: GenerationRequest, caller: Principal) -> str:
        if not may_generate(caller):
            raise Forbidden("this token may not generate images (scope 'generate' missing)")
        # On a worker thread: the engine decodes input images at submit, which must not stall the
        # event loop (other MCP sessions, and /mcp shares its loop with the websocket door).
        job = await anyio.to_thread.run_sync(lambda: self.runtime.engine.submit(request, owner=caller.name))
        return job.job_id

    def _job(self, job_id: str, caller: Principal) -> Job:
        # Someone else's job is "not found", so ids cannot be probed (reliability matrix #16).
        job = self.runtime.engine.get_job(job_id)
        if job is None or not may_view_job(caller, job.owner):
            raise NotFound(f"no job {job_id!r}; job ids come from generate_image")
        return job

    @contextlib.asynccontextmanager
    async def follow(self, job_id: str, caller: Principal) -> AsyncIterator[AsyncIterator[Event]]:
        if self._recorded(job_id, caller) is not None:  # an earlier process's job: nothing to follow
            yield _no_events()
            return
        job = self._job(job_id, caller)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(event: Event) -> None:  # worker thread: never block, skip previews
            if not isinstance(event, Preview):
                loop.call_soon_threadsafe(queue.put_nowait, event)

        async with events_until_terminal(queue, job.subscribe(on_event, after_seq=0)) as events:
            yield events

    async def job(self, job_id: str, caller: Principal) -> JobView:
        record = self._recorded(job_id, caller)
        if record is not None:
            return recorded_job_view(record)
        return job_view(self._job(job_id, caller), self.runtime.engine.queue_position(job_id))

    async def cancel(self, job_id: str, caller: Principal) -> bool:
        if self._recorded(job_id, caller) is not None:
            return False  # finished, or interrupted with the process that ran it
        job = self.runtime.engine.get_job(job_id)
        if job is None or not may_cancel(caller, job.owner):
            if job is not None and may_view_job(caller, job.owner):  # the owner, lacking the scope
                raise Forbidden("this token may not cancel jobs (scope 'cancel:own' missing)")
            raise NotFound(f"no job {job_id!r}; job ids come from generate_image")
        return self.runtime.engine.cancel(job_id)

    async def image(self, sha256: str) -> StoredImage | None:
        return self.runtime.images.get(sha256)

    async def describe(self, params: dict[str, Any], caller: Principal) -> dict[str, Any]:
        if not may_generate(caller):
            raise Forbidden("this token may not describe images (scope 'generate' missing)")
        describer = self.runtime.describer
        if describer is None:
            raise InvalidRequest("this server does not describe images")
        # Cancelling this call (the client's notifications/cancelled) cancels the describe.
        result = await describer.describe_async(params, owner=caller.name)
        return dict(result.to_dict())

    async def may_read_image(self, sha256: str, caller: Principal) -> bool:
        if may_read_image(caller, self.runtime.images.owners(sha256)):
            return True
        # An image of an earlier process (stdio: one process per host session) is owned per the history.
        if self.history is None:
            return False
        return may_read_image(caller, await anyio.to_thread.run_sync(self.history.image_owners, sha256))

    async def preview(self, job_id: str, caller: Principal) -> np.ndarray | None:
        preview = self._job(job_id, caller).latest_preview
        return None if preview is None else preview.rgb


@contextlib.asynccontextmanager
async def events_until_terminal(queue: asyncio.Queue[Event], unsubscribe: Callable[[], None]
                                ) -> AsyncIterator[AsyncIterator[Event]]:
    """The events put on `queue`, up to and including the terminal one; `unsubscribe` runs on exit.

    Shared by the local and the remote backend's `follow`, which differ only in how events reach the queue.
    """
    async def events() -> AsyncIterator[Event]:
        while True:
            event = await queue.get()
            yield event
            if isinstance(event, TERMINAL_EVENTS):
                return

    try:
        yield events()
    finally:
        unsubscribe()


async def _no_events() -> AsyncIterator[Event]:
    return
    yield  # an async generator that ends at once


def recorded_job_view(record: dict[str, Any]) -> JobView:
    """A :class:`JobView` of an ``engine.core.history`` record (a job of an earlier process).

    A record still "queued"/"running" belongs to a process that is gone or busy elsewhere; it is
    shown as the history has it. Step counts are not recorded: a done job shows steps x images."""
    images = tuple(ImageInfo(index=i["index"], seed=str(i["seed"]), sha256=i["sha256"], mime=i["mime"],
                             width=i["width"], height=i["height"], size_bytes=i["size_bytes"])
                   for i in record.get("images", ()))
    params = dict(record.get("params") or {})
    steps = params.get("steps") if isinstance(params.get("steps"), int) else 0
    total = steps * len(images) if record["state"] == "done" else 0
    return JobView(job_id=record["job_id"], state=record["state"], params=params,
                   seeds=tuple(str(s) for s in record.get("seeds") or ()), done_steps=total, total_steps=total,
                   images=images, error=record.get("error"), created_at=record.get("created_at"),
                   started_at=record.get("started_at"), finished_at=record.get("finished_at"))


def job_view(job: Job, queue_position: int | None) -> JobView:
    """Snapshot an engine job (any thread)."""
    total_steps = 0
    for event in job.events_after(0):
        if isinstance(event, Started):
            total_steps = event.total_steps
            break
    progress = job.last_progress
    done = 0 if progress is None else steps_done(progress)
    if total_steps == 0 and progress is not None:  # Started fell out of the bounded event log
        total_steps = progress.total_steps * progress.image_count
    if job.state.value == "done":
        done = total_steps
    images = tuple(ImageInfo(index=img.index, seed=str(img.seed), sha256=img.sha256, mime=img.mime,
                             width=img.width, height=img.height, size_bytes=len(img.data)) for img in job.images)
    return JobView(job_id=job.job_id, state=job.state.value, queue_position=queue_position,
                   params=dict(job.resolved_params), seeds=tuple(str(s) for s in job.seeds),
                   done_steps=min(done, total_steps) if total_steps else done, total_steps=total_steps,
                   images=images, error=job.error, created_at=job.created_at, started_at=job.started_at,
                   finished_at=job.finished_at)
