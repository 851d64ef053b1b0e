"""What the MCP tools return: the result schema (``outputSchema``), its one-line summary, and
progress reporting (api_anchors §11.1). Shared by every tool; no tool is registered here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.core.events import Done, Event, Progress, Started
from hooocus_mcp.backend import JobView, steps_done

# -- result schema (outputSchema) -------------------------------------------------------------------

class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageRef(_Out):
    uri: str = Field(description="hooocus://images/<sha256>; read it as a resource for the full image")
    index: int
    seed: str = Field(description="decimal string (seeds exceed JavaScript's safe integers)")
    width: int
    height: int
    mime_type: str
    sha256: str
    size_bytes: int


class JobProgress(_Out):
    done_steps: int
    total_steps: int


class JobError(_Out):
    code: str
    message: str
    error_id: str | None = None


class Timings(_Out):
    queued_ms: int | None = None
    run_ms: int | None = None


class JobResult(_Out):
    """What generate_image and get_job return (structuredContent)."""

    job_id: str
    status: Literal["running", "completed", "cancelled", "failed"] = Field(
        description="'running' also covers a job still waiting in the queue (see queue_position)")
    queue_position: int | None = Field(None, description="jobs ahead of this one; null once it runs")
    progress: JobProgress
    images: list[ImageRef]
    seeds: list[str]
    params_resolved: dict[str, Any]
    timings: Timings
    error: JobError | None = None


class CancelResult(_Out):
    job_id: str
    cancelled: bool = Field(description="false when the job had already finished")
    status: Literal["running", "completed", "cancelled", "failed"]
    images: list[ImageRef] = Field(description="images finished before the cancel")


_STATUS_BY_STATE = {"queued": "running", "running": "running", "done": "completed", "cancelled": "cancelled",
                    "failed": "failed"}


def image_uri(sha256: str) -> str:
    return f"hooocus://images/{sha256}"


def job_result(view: JobView) -> JobResult:
    def ms(start: float | None, end: float | None) -> int | None:
        return None if start is None or end is None else max(0, round((end - start) * 1000))

    images = [ImageRef(uri=image_uri(i.sha256), index=i.index, seed=i.seed, width=i.width, height=i.height,
                       mime_type=i.mime, sha256=i.sha256, size_bytes=i.size_bytes) for i in view.images]
    error = None if view.error is None else JobError(code=str(view.error.get("code", "internal_error")),
                                                     message=str(view.error.get("message", "")),
                                                     error_id=view.error.get("error_id") or None)
    return JobResult(job_id=view.job_id, status=_STATUS_BY_STATE[view.state],  # type: ignore[arg-type]
                     queue_position=view.queue_position if view.state == "queued" else None,
                     progress=JobProgress(done_steps=view.done_steps, total_steps=view.total_steps),
                     images=images, seeds=list(view.seeds), params_resolved=view.params,
                     timings=Timings(queued_ms=ms(view.created_at, view.started_at),
                                     run_ms=ms(view.started_at, view.finished_at)),
                     error=error)


def summary_line(result: JobResult) -> str:
    """One line for the model: what happened and where the full images are."""
    n = len(result.images)
    noun = "image" if n == 1 else "images"
    uris = ", ".join(i.uri for i in result.images)
    if result.status == "completed":
        seeds = ", ".join(i.seed for i in result.images)
        took = "" if result.timings.run_ms is None else f" in {result.timings.run_ms / 1000:.1f}s"
        return f"Generated {n} {noun} (seeds {seeds}){took}. Full-size: {uris}"
    if result.status == "running":
        where = (f"queued at position {result.queue_position}" if result.queue_position is not None
                 else f"step {result.progress.done_steps}/{result.progress.total_steps}")
        return (f"Job {result.job_id} is still running ({where}); call get_job(job_id={result.job_id!r}) "
                f"to follow it or cancel_job to stop it.")
    if result.status == "cancelled":
        return f"Job {result.job_id} was cancelled after {n} {noun}." + (f" Finished: {uris}" if n else "")
    err = result.error or JobError(code="internal_error", message="")
    return f"Job {result.job_id} failed ({err.code}): {err.message}"


# -- progress -----------------------------------------------------------------------------------------

@dataclass
class ProgressReporter:
    """Turns job events into MCP progress values that strictly increase and end at the total.

    Steps are counted over all images (api_anchors §11.1); reports closer than ``min_interval_s``
    are dropped except the final one, so a fast sampler cannot flood the client.
    """

    send: Callable[[float, float | None, str | None], Any]
    min_interval_s: float = 0.25
    clock: Callable[[], float] = time.monotonic
    total: int = 0
    last_sent: int = 0
    _last_time: float = float("-inf")

    async def on_event(self, event: Event) -> None:
        if isinstance(event, Started):
            self.total = max(self.total, event.total_steps)
        elif isinstance(event, Progress):
            done = steps_done(event)
            total = self.total or event.total_steps * event.image_count
            message = (f"image {event.image_index + 1}/{event.image_count} · step {event.step}/{event.total_steps}"
                       f" · {event.stage}")
            await self._report(min(done, total), total, message)
        elif isinstance(event, Done) and self.total:
            await self._report(self.total, self.total, "done", force=True)

    async def _report(self, done: int, total: int, message: str, *, force: bool = False) -> None:
        if done <= self.last_sent:
            return
        now = self.clock()
        if not force and done < total and now - self._last_time < self.min_interval_s:
            return
        self.last_sent, self._last_time = done, now
        await self.send(float(done), float(total), message)
