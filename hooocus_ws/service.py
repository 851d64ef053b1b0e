"""Job operations shared by the websocket and HTTP routes: one place for ownership and scopes.

Jobs belong to the token's principal (``job.owner == principal.name``), not to a socket. Someone
else's job is ``not_found`` unless the caller holds the scope that covers it, so a job id is
never an existence oracle (reliability matrix row 16).
"""

from __future__ import annotations

import time
from typing import Any

from engine.errors import HooocusError, InvalidRequest, NotFound
from engine.events import ImageReady, Queued
from engine.jobs import Job, JobState
from hooocus_ws.context import ServerContext
from hooocus_ws.tokens import Principal


def forbidden(message: str) -> HooocusError:
    return HooocusError(message, code="forbidden")


def submit_job(ctx: ServerContext, principal: Principal, params: dict[str, Any],
               request_id: str | None) -> tuple[Job, int, bool]:
    """Queue ``params`` for ``principal``: (job, queue position, duplicate?). A repeated
    ``request_id`` within the retention window returns the first job (idempotent retry)."""
    if not principal.can("generate"):
        raise forbidden("this token may not generate (scope 'generate' missing)")
    engine = ctx.runtime.engine
    if request_id is not None:
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
            raise InvalidRequest("request_id must be a string of 1 to 128 characters", loc=("request_id",))
        existing = ctx.idempotency.get(principal.name, request_id)
        job = engine.get_job(existing) if existing else None
        if job is not None:
            return job, engine.queue_position(job.job_id) or 0, True
    job = engine.submit(params, owner=principal.name)
    if request_id is not None:
        ctx.idempotency.put(principal.name, request_id, job.job_id)
    first = job.events_after(0)
    position = first[0].position if first and isinstance(first[0], Queued) else 0
    return job, position, False


def visible_job(ctx: ServerContext, principal: Principal, job_id: str) -> Job:
    """The job if ``principal`` owns it (or is admin) and it is within the retention window."""
    job = ctx.runtime.engine.get_job(job_id)
    if job is None or not (job.owner == principal.name or principal.can("admin")):
        raise NotFound(f"no job {job_id!r}")
    if job.finished_at is not None and time.time() - job.finished_at > ctx.limits.event_retention_s:
        raise NotFound(f"no job {job_id!r} (its events have expired)")
    return job


def check_cancel_allowed(ctx: ServerContext, principal: Principal, job_id: str) -> Job:
    """The job if ``principal`` may cancel it: own job with cancel:own, or any job with cancel:any."""
    job = ctx.runtime.engine.get_job(job_id)
    own = job is not None and job.owner == principal.name
    if job is None or not (own or principal.can("cancel:any")):
        raise NotFound(f"no job {job_id!r}")
    if own and not (principal.can("cancel:own") or principal.can("cancel:any")):
        raise forbidden("this token may not cancel jobs (scope 'cancel:own' missing)")
    return job


def cancel_job(ctx: ServerContext, job: Job, *, reason: str = "user") -> JobState:
    """Cancel ``job``; returns its state before the request (a finished job is left as it is)."""
    before = job.state
    if not before.terminal:
        ctx.runtime.engine.cancel(job.job_id, reason=reason)
    return before


def image_entry(ctx: ServerContext, image: ImageReady) -> dict[str, Any]:
    return {"index": image.index, "seed": str(image.seed), "sha256": image.sha256, "width": image.width,
            "height": image.height, "mime": image.mime, "size_bytes": len(image.data),
            "url": ctx.image_url(image.sha256, image.extension)}


def job_summary(ctx: ServerContext, job: Job) -> dict[str, Any]:
    """JSON view of a job for HTTP callers (no image bytes; image URLs are signed)."""
    info = job.info()
    info.pop("owner", None)
    info["images"] = [image_entry(ctx, image) for image in list(job.images)]
    info["position"] = ctx.runtime.engine.queue_position(job.job_id)
    return info
