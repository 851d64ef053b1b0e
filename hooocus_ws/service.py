"""Job operations shared by the websocket and HTTP routes.

Who may see, cancel or list which job is decided by :mod:`engine.core.access` (the same rules
as the MCP door): jobs belong to the token's principal, and someone else's job is ``not_found``
unless the caller holds the scope that covers it (reliability matrix row 16).

Finished jobs are read back from the SQLite history (``ctx.history``) when there is one, so they
outlive both the in-memory retention window and a restart; unfinished ones come from the engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import anyio.to_thread

from engine.core.access import Principal, may_cancel, may_generate, may_view_job, sees_every_job
from engine.core.errors import Forbidden, HooocusError, InvalidRequest, NotFound
from engine.core.events import TERMINAL_EVENTS, Event, ImageReady, Queued
from engine.core.formats import extension_for_mime
from engine.core.history import MAX_LIST_LIMIT
from engine.core.jobs import Job, JobState
from hooocus_ws.context import ServerContext

log = logging.getLogger("hooocus.ws.jobs")

_TERMINAL_STATES = frozenset(state.value for state in JobState if state.terminal)


def _log_outcome(job: Job, event: Event) -> None:
    # Worker thread; one short record per finished job, tagged with the job and its owner.
    if isinstance(event, TERMINAL_EVENTS):
        extra = {"job_id": job.job_id, "principal": job.owner}
        detail = getattr(event, "reason", None) or getattr(event, "code", None)
        log.info("job %s %s%s", job.job_id, event.kind, f" ({detail})" if detail else "", extra=extra)


def params_fingerprint(params: dict[str, Any]) -> str:
    """A stable digest of a request's parameters (key order does not matter)."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def submit_job(ctx: ServerContext, principal: Principal, params: dict[str, Any],
               request_id: str | None) -> tuple[Job, int, bool]:
    """Queue ``params`` for ``principal``: (job, queue position, duplicate?). A repeated
    ``request_id`` within the retention window returns the first job (idempotent retry).

    Blocking (the engine decodes input images at submit): the doors call it on a worker thread
    (:func:`submit_job_async`), so it is thread-safe."""
    if not may_generate(principal):
        raise Forbidden("this token may not generate (scope 'generate' missing)")
    engine = ctx.runtime.engine
    if request_id is None:
        job = engine.submit(params, owner=principal.name)
    else:
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
            raise InvalidRequest("request_id must be a string of 1 to 128 characters", loc=("request_id",))
        fingerprint = params_fingerprint(params)
        # One keyed submit at a time: two retries racing on threads must not both queue a job.
        with ctx.idempotency.claim:
            existing = ctx.idempotency.get(principal.name, request_id)
            job = engine.get_job(existing[0]) if existing else None
            if job is not None and existing is not None:
                if existing[1] != fingerprint:
                    raise HooocusError(f"request_id {request_id!r} was already used with different parameters "
                                       f"(job {job.job_id}); use a new request_id", code="conflict",
                                       loc=("request_id",))
                return job, engine.queue_position(job.job_id) or 0, True
            job = engine.submit(params, owner=principal.name)
            ctx.idempotency.put(principal.name, request_id, job.job_id, fingerprint)
    extra = {"job_id": job.job_id, "principal": principal.name}
    log.info("job %s queued", job.job_id, extra=extra)
    # Prompts are user data: only at DEBUG, and only as extras (logging_setup hides them above DEBUG).
    log.debug("job %s request", job.job_id, extra={**extra, "prompt": job.request.prompt,
                                                    "negative_prompt": job.request.negative_prompt})
    job.subscribe(lambda event: _log_outcome(job, event), after_seq=0)
    first = job.events_after(0)
    position = first[0].position if first and isinstance(first[0], Queued) else 0
    return job, position, False


async def submit_job_async(ctx: ServerContext, principal: Principal, params: dict[str, Any],
                           request_id: str | None) -> tuple[Job, int, bool]:
    """:func:`submit_job` on a worker thread: decoding a large input image (up to the pixel cap)
    must not stall every other request and websocket on the event loop."""
    return await anyio.to_thread.run_sync(submit_job, ctx, principal, params, request_id)


def visible_job(ctx: ServerContext, principal: Principal, job_id: str) -> Job:
    """The job if ``principal`` owns it (or is admin) and it is within the retention window."""
    job = ctx.runtime.engine.get_job(job_id)
    if job is None or not may_view_job(principal, job.owner):
        raise NotFound(f"no job {job_id!r}")
    if job.finished_at is not None and time.time() - job.finished_at > ctx.limits.event_retention_s:
        raise NotFound(f"no job {job_id!r} (its events have expired)")
    return job


def check_cancel_allowed(ctx: ServerContext, principal: Principal, job_id: str) -> Job:
    """The job if ``principal`` may cancel it: own job with cancel:own, or any job with cancel:any."""
    job = ctx.runtime.engine.get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    if not may_cancel(principal, job.owner):
        if may_view_job(principal, job.owner):  # the owner, lacking the scope: say so
            raise Forbidden("this token may not cancel jobs (scope 'cancel:own' missing)")
        raise NotFound(f"no job {job_id!r}")
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


# -- history (GET /v1/jobs, GET /v1/jobs/{id}) ------------------------------------------------------------


def history_entry(ctx: ServerContext, record: dict[str, Any], *, admin: bool) -> dict[str, Any]:
    """A history record in the shape of :func:`job_summary`; owner and file paths only for admins."""
    entry = dict(record)
    entry["position"] = None
    if not admin:
        entry.pop("owner", None)
    images = []
    for image in record["images"]:
        image = dict(image)
        image["url"] = ctx.image_url(image["sha256"], extension_for_mime(image["mime"]))
        if not admin:
            image.pop("path", None)
        images.append(image)
    entry["images"] = images
    return entry


def _live_entry(ctx: ServerContext, job: Job, *, admin: bool) -> dict[str, Any]:
    entry = job_summary(ctx, job)
    if admin:
        entry["owner"] = job.owner
    return entry


def job_record(ctx: ServerContext, principal: Principal, job_id: str) -> dict[str, Any]:
    """``GET /v1/jobs/{id}``: live while unfinished, else from the history (after a restart too).
    Missing, or someone else's without the admin scope: ``not_found``."""
    admin = sees_every_job(principal)
    job = ctx.runtime.engine.get_job(job_id)
    if job is not None and not may_view_job(principal, job.owner):
        raise NotFound(f"no job {job_id!r}")
    if job is not None and not job.state.terminal:
        return _live_entry(ctx, job, admin=admin)
    record = ctx.history.get_job(job_id) if ctx.history is not None else None
    # A live job whose final row is not written yet (or whose write failed) is shown live.
    if record is not None and (job is None or record["state"] in _TERMINAL_STATES):
        if not may_view_job(principal, record["owner"]):
            raise NotFound(f"no job {job_id!r}")
        return history_entry(ctx, record, admin=admin)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return _live_entry(ctx, visible_job(ctx, principal, job_id), admin=admin)


def parse_list_limit(raw: str | None, default: int = 50) -> int:
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}", loc=("limit",))
    return limit


def list_jobs(ctx: ServerContext, principal: Principal, *, limit: int, before: str | None) -> dict[str, Any]:
    """``GET /v1/jobs``: the caller's jobs (everyone's for admins), newest first, ``limit`` per page;
    ``next_before`` is the cursor for the next page (None once a page comes back short). Blocking (SQLite)."""
    admin = sees_every_job(principal)
    owner = None if admin else principal.name
    engine = ctx.runtime.engine
    jobs: list[dict[str, Any]] = []
    if ctx.history is not None:
        for record in ctx.history.list_jobs(owner=owner, limit=limit, before=before):
            live = engine.get_job(record["job_id"])
            if live is not None and not live.state.terminal:  # live progress and queue position
                jobs.append(_live_entry(ctx, live, admin=admin))
            else:
                jobs.append(history_entry(ctx, record, admin=admin))
    else:  # no history: the jobs the engine still remembers
        mine = [job for job in reversed(engine.jobs()) if owner is None or job.owner == owner]
        if before is not None:
            ids = [job.job_id for job in mine]
            if before not in ids:
                raise InvalidRequest(f"unknown cursor {before!r}", loc=("before",))
            mine = mine[ids.index(before) + 1:]
        jobs += [_live_entry(ctx, job, admin=admin) for job in mine[:limit]]
    next_before = jobs[-1]["job_id"] if len(jobs) == limit else None
    return {"jobs": jobs, "next_before": next_before}
