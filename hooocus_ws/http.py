"""HTTP companions of the websocket (same app, same tokens as ``Authorization: Bearer``).

``POST /v1/generate``, ``POST /v1/uploads`` (input images), ``GET /v1/jobs`` (history, newest first), ``GET|DELETE /v1/jobs/{id}``,
``GET /v1/images/{sha256}.{ext}`` (token or signed URL; falls back to the files the history wrote), ``GET /v1/options``, ``GET /healthz``, ``GET /metrics``, ``GET /openapi.json``,
``GET /v1/protocol.json``. Every error is ``{"error": {code, message, loc?}}`` with the status from
``engine.core.errors.HTTP_STATUS_BY_CODE``; a traceback never reaches a client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from engine.core.access import Principal, may_generate, may_read_image
from engine.core.errors import HTTP_STATUS_BY_CODE, Forbidden, HooocusError, ImageTooLarge, InvalidRequest, NotFound
from engine.core.events import TERMINAL_EVENTS, Cancelled, Event
from engine.core.formats import MIME_BY_FORMAT, format_for_extension
from engine.core.inputs import base64_cap
from engine.core.jobs import Job, JobState
from engine.core.request import GenerationRequest
from hooocus_ws import service
from hooocus_ws.context import ServerContext
from hooocus_ws.protocol import protocol_schema

log = logging.getLogger("hooocus.http")

Handler = Callable[[Request], Awaitable[Response]]

#: Retry-After for a full queue: a slot frees when a job ends, typically seconds to a minute on a
#: GPU; a short hint keeps clients from hammering and from giving up too early.
QUEUE_FULL_RETRY_AFTER_S = 10.0


def context(request: Request) -> ServerContext:
    return request.app.state.hooocus  # type: ignore[no-any-return]


def error_response(exc: HooocusError) -> JSONResponse:
    """The one mapping from a HooocusError to an HTTP response (and for handshake denials)."""
    status = HTTP_STATUS_BY_CODE.get(exc.code, 400)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="hooocus"'
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is None and exc.code == "queue_full":
        retry_after = QUEUE_FULL_RETRY_AFTER_S
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    return JSONResponse({"error": exc.to_dict()}, status_code=status, headers=headers)


def guarded(handler: Handler) -> Handler:
    """Turn HooocusErrors into their HTTP form and anything else into an opaque internal_error."""

    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except HooocusError as exc:
            return error_response(exc)
        except Exception:
            error_id = secrets.token_hex(6)
            log.exception("HTTP %s %s failed (error_id %s)", request.method, request.url.path, error_id)
            return error_response(HooocusError(f"internal error (error_id {error_id})", code="internal_error"))

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def authenticate(request: Request) -> Principal:
    ctx = context(request)
    client = ctx.gate.address_of(request.client.host if request.client else None, request.headers)
    return ctx.gate.authenticate(headers=request.headers, address=client, scheme=request.url.scheme,
                                 query_string=request.scope.get("query_string", b""))


async def read_body(request: Request, max_bytes: int, *, too_large: type[HooocusError] = InvalidRequest,
                    loc: tuple[str | int, ...] | None = None) -> bytes:
    """The whole body, refused (``too_large``) as soon as it passes ``max_bytes``: a declared
    Content-Length over the cap is refused before a byte is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(f"request body larger than {max_bytes} bytes", loc=loc)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large(f"request body larger than {max_bytes} bytes", loc=loc)
    return bytes(body)


async def read_json_body(request: Request, max_bytes: int) -> Any:
    body = await read_body(request, max_bytes)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise HooocusError("the body is not valid JSON", code="invalid_request") from None


async def wait_for_job(job: Job, timeout_s: float) -> bool:
    """True once ``job`` has finished, False after ``timeout_s``. Never blocks the loop."""
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()

    def listener(event: Event) -> None:  # worker thread
        if isinstance(event, TERMINAL_EVENTS):
            try:
                loop.call_soon_threadsafe(finished.set)
            except RuntimeError:
                pass

    unsubscribe = job.subscribe(listener, after_seq=None)
    try:
        if job.state.terminal:
            return True
        try:
            await asyncio.wait_for(finished.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
    finally:
        unsubscribe()


# -- routes ------------------------------------------------------------------------------------------


@guarded
async def generate(request: Request) -> Response:
    """Queue a GenerationRequest; by default wait and return the images' URLs, seeds and resolved params.

    Extra body keys: ``wait`` (bool, default true), ``request_id`` (idempotency key).
    ``Accept: image/*`` returns the first image's bytes instead of JSON.
    """
    ctx = context(request)
    principal = authenticate(request)
    # Room for one input image inline as a data URI (engine/core/inputs.py caps it again); more or
    # larger images go through POST /v1/uploads and are named by sha256.
    body = await read_json_body(request, ctx.limits.max_http_body_bytes
                                + base64_cap(ctx.runtime.settings.max_upload_bytes))
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object (a GenerationRequest)")
    wait = body.pop("wait", True)
    if not isinstance(wait, bool):
        raise InvalidRequest("wait must be true or false", loc=("wait",))
    request_id = body.pop("request_id", None)
    job, position, duplicate = await service.submit_job_async(ctx, principal, body, request_id)
    ctx.metrics.http_generate += 1
    if not wait or not await wait_for_job(job, ctx.limits.http_wait_timeout_s):
        return JSONResponse({"job_id": job.job_id, "state": job.state.value, "position": position,
                             "duplicate": duplicate, "status_url": f"/v1/jobs/{job.job_id}"}, status_code=202)
    if job.state == JobState.FAILED:
        error = job.error or {}
        exc = HooocusError(error.get("message", "the job failed"), code=error.get("code", "internal_error"),
                           details={"job_id": job.job_id, "error_id": error.get("error_id")})
        return error_response(exc)
    if job.state == JobState.CANCELLED:
        reason = next((e.reason for e in reversed(job.events_after(0)) if isinstance(e, Cancelled)), "user")
        # The summary's own "error" (None for a cancelled job) must not replace the error object.
        summary = service.job_summary(ctx, job)
        summary["error"] = {"code": "cancelled", "reason": reason, "message": f"the job was cancelled ({reason})"}
        return JSONResponse(summary, status_code=HTTP_STATUS_BY_CODE["cancelled"])
    accept = request.headers.get("accept", "")
    if "image/" in accept and "application/json" not in accept and job.images:
        first = job.images[0]
        return Response(first.data, media_type=first.mime,
                        headers={"X-Hooocus-Job-Id": job.job_id, "X-Hooocus-Seed": str(first.seed),
                                 "X-Hooocus-Sha256": first.sha256})
    return JSONResponse(service.job_summary(ctx, job))


#: Multipart framing (boundaries, part headers) allowed on top of the file itself.
MULTIPART_OVERHEAD_BYTES = 16 * 1024


@guarded
async def upload(request: Request) -> Response:
    """Keep an input image for the caller: the raw body (``Content-Type: image/*``) or a multipart
    form's ``file`` field. 201 ``{sha256, width, height, content_type, size_bytes}``; use
    ``"sha256:<sha256>"`` as ``input_image`` / ``inpaint_mask``. Only this token's principal can."""
    ctx = context(request)
    principal = authenticate(request)
    if not may_generate(principal):
        raise Forbidden("this token may not upload images (scope 'generate' missing)")
    uploads = ctx.runtime.uploads
    if uploads is None:
        raise InvalidRequest("this server does not take uploads")
    max_bytes = ctx.runtime.settings.max_upload_bytes
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "multipart/form-data":
        # The body is read under the cap first, then parsed from memory: starlette's parser would
        # otherwise spool an unbounded body to disk before we could look at it.
        body = await read_body(request, max_bytes + MULTIPART_OVERHEAD_BYTES, too_large=ImageTooLarge,
                               loc=("file",))
        data = await _multipart_file(request, body, max_bytes)
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        data = await read_body(request, max_bytes, too_large=ImageTooLarge, loc=("body",))
    else:
        raise InvalidRequest("send the image as the body (Content-Type: image/...) or as the 'file' field of "
                             "a multipart/form-data form", loc=("content-type",))
    loc = ("file",) if content_type == "multipart/form-data" else ("body",)
    info = await anyio.to_thread.run_sync(lambda: uploads.put(data, owner=principal.name, loc=loc))
    return JSONResponse(info.to_dict(), status_code=201)


async def _multipart_file(request: Request, body: bytes, max_bytes: int) -> bytes:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive=replay).form(max_files=1, max_fields=8)
    except Exception:  # starlette raises its own parse errors (MultiPartException, HTTPException)
        raise InvalidRequest("the multipart form could not be parsed", loc=("file",)) from None
    try:
        part = form.get("file")
        if part is None or isinstance(part, str):
            raise InvalidRequest("the form has no 'file' field with the image", loc=("file",))
        data = await part.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageTooLarge(f"the upload is larger than {max_bytes} bytes", loc=("file",))
        return data
    finally:
        await form.close()


@guarded
async def list_jobs(request: Request) -> Response:
    """The caller's jobs (everyone's for admins), newest first: ``?limit=50&before=<job_id>``."""
    ctx = context(request)
    principal = authenticate(request)
    limit = service.parse_list_limit(request.query_params.get("limit"))
    before = request.query_params.get("before") or None
    page = await anyio.to_thread.run_sync(lambda: service.list_jobs(ctx, principal, limit=limit, before=before))
    return JSONResponse(page)


@guarded
async def get_job(request: Request) -> Response:
    """Status, progress, seeds, resolved params and image URLs of one of the caller's jobs
    (admins: anyone's); finished jobs come from the history, so they survive a restart."""
    ctx = context(request)
    principal = authenticate(request)
    job_id = request.path_params["job_id"]
    return JSONResponse(await anyio.to_thread.run_sync(service.job_record, ctx, principal, job_id))


@guarded
async def delete_job(request: Request) -> Response:
    """Cancel a queued or running job (own with cancel:own, any with cancel:any)."""
    ctx = context(request)
    principal = authenticate(request)
    job = service.check_cancel_allowed(ctx, principal, request.path_params["job_id"])
    before = service.cancel_job(ctx, job, reason="user")
    return JSONResponse({"job_id": job.job_id, "state_before": before.value, "cancelled": not before.terminal})


@guarded
async def get_image(request: Request) -> Response:
    """An image by content hash: a valid ``exp``/``sig`` pair (a shareable link), or the bearer
    token of a principal whose job produced it, or an admin's. Anyone else gets ``not_found``, as
    for a missing image (its PNG metadata holds the prompt; a hash must not be an existence oracle)."""
    ctx = context(request)
    name = request.path_params["name"]
    sha256, _, ext = name.partition(".")
    query = request.query_params
    if "sig" in query or "exp" in query:
        if not ctx.signer.verify(request.url.path, query.get("exp"), query.get("sig")):
            raise Forbidden("the image link is invalid or has expired")
    else:
        principal = authenticate(request)
        if not await _may_read_image(ctx, principal, sha256):
            raise NotFound(f"no image {name!r}")
    ext = format_for_extension(ext)
    image = ctx.runtime.images.get(sha256)
    if image is not None and image.extension == ext:
        return Response(image.data, media_type=image.mime, headers=_image_headers(image.sha256))
    # Not in memory (an older job, or a restart): the file the history wrote, if it is still there.
    path = None
    if image is None and ctx.history is not None:
        path = await anyio.to_thread.run_sync(ctx.history.image_path, sha256)
    if path is None or path.suffix.lower() != f".{ext}":
        raise NotFound(f"no image {name!r}")
    return FileResponse(path, media_type=MIME_BY_FORMAT.get(ext, "application/octet-stream"),
                        headers=_image_headers(sha256.lower()))


async def _may_read_image(ctx: ServerContext, principal: Principal, sha256: str) -> bool:
    # The in-memory owners first; the history (SQLite, off the loop) only when they do not say yes.
    if may_read_image(principal, ctx.runtime.images.owners(sha256)):
        return True
    if ctx.history is None:
        return False
    return may_read_image(principal, await anyio.to_thread.run_sync(ctx.history.image_owners, sha256))


def _image_headers(sha256: str) -> dict[str, str]:
    return {"Cache-Control": "private, max-age=31536000, immutable", "ETag": f'"{sha256}"',
            "X-Content-Type-Options": "nosniff"}


@guarded
async def options(request: Request) -> Response:
    """What a caller may choose (models, styles, samplers, aspect ratios ...), from the runner."""
    ctx = context(request)
    authenticate(request)
    # Off the event loop: with --backend ray the answer is a round trip to the cluster.
    return JSONResponse(await anyio.to_thread.run_sync(ctx.runtime.engine.runner.options))


async def healthz(request: Request) -> Response:
    ctx = context(request)
    engine = ctx.runtime.engine
    stats = engine.stats()
    ok = engine.accepting and not ctx.closing
    return JSONResponse({"status": "ok" if ok else "shutting_down", "queue_depth": stats.queue_depth,
                         "running": stats.running_job_id is not None}, status_code=200 if ok else 503)


@guarded
async def metrics(request: Request) -> Response:
    ctx = context(request)
    authenticate(request)
    return PlainTextResponse(ctx.metrics.render(ctx.runtime.engine), media_type="text/plain; version=0.0.4")


async def protocol_json(request: Request) -> Response:
    return JSONResponse(protocol_schema())


def _generate_body_schema() -> dict[str, Any]:
    schema = GenerationRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    schema["properties"]["wait"] = {"type": "boolean", "default": True,
                                    "description": "false: answer 202 {job_id} at once"}
    schema["properties"]["request_id"] = {"type": "string", "maxLength": 128,
                                          "description": "idempotency key: a retry returns the first job"}
    return schema


def openapi_document() -> dict[str, Any]:
    components = GenerationRequest.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs", {})
    error = {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "loc": {"type": "array"}}}}}
    components["GenerateBody"] = _generate_body_schema()
    components["Error"] = error
    err = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    job_param = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    secured = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "Hooocus HTTP API", "version": "1",
                 "description": "HTTP companions of the hooocus.v1 websocket (/v1/ws, see /v1/protocol.json)."},
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/generate": {"post": {
                "summary": "Generate images (waits by default)", "security": secured,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/GenerateBody"}}}},
                "responses": {"200": {"description": "the finished job (JSON) or, with Accept: image/*, the "
                                                     "first image's bytes"},
                              "202": {"description": "queued (wait=false, or still running after the wait limit)"},
                              "401": err, "409": err, "422": err, "429": err, "503": err}}},
            "/v1/uploads": {"post": {
                "summary": "Upload an input image (raw image/* body, or multipart field 'file'); use "
                           "'sha256:<sha256>' as input_image / inpaint_mask. Owned by the caller's principal.",
                "security": secured,
                "requestBody": {"required": True, "content": {
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {
                        "file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}},
                "responses": {"201": {"description": "{sha256, width, height, content_type, size_bytes}"},
                              "401": err, "403": err, "413": err, "422": err}}},
            "/v1/describe": describe_openapi_path(),
            "/v1/parameters": {"post": {
                "summary": "Read the generation parameters a Fooocus/A1111 image holds (raw image body), as "
                           "GenerationRequest fields with warnings for what this server cannot use",
                "security": secured,
                "requestBody": {"required": True, "content": {
                    "image/*": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {"200": {"description": "the request fields and warnings"},
                              "401": err, "413": err, "422": err}}},
            "/v1/jobs": {"get": {
                "summary": "The caller's jobs (admins: everyone's), newest first, from the job history",
                "security": secured,
                "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                           "maximum": 500, "default": 50}},
                               {"name": "before", "in": "query", "schema": {"type": "string"},
                                "description": "cursor: next_before of the previous page"}],
                "responses": {"200": {"description": "{jobs: [...], next_before}"}, "401": err, "422": err}}},
            "/v1/jobs/{job_id}": {
                "get": {"summary": "Job status and progress", "security": secured, "parameters": job_param,
                        "responses": {"200": {"description": "job"}, "404": err}},
                "delete": {"summary": "Cancel a job", "security": secured, "parameters": job_param,
                           "responses": {"200": {"description": "cancel requested"}, "404": err}}},
            "/v1/images/{name}": {"get": {
                "summary": "An image by sha256 ({sha256}.{ext}); the owner's (or an admin's) bearer token, or "
                           "an exp+sig query", "security": [{"bearer": []}, {}],
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                               {"name": "exp", "in": "query", "schema": {"type": "integer"}},
                               {"name": "sig", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "image bytes"}, "401": err, "403": err, "404": err,
                              "429": err}}},
            "/v1/options": {"get": {"summary": "Models, styles, samplers, aspect ratios, defaults",
                                    "security": secured, "responses": {"200": {"description": "options"}}}},
            "/healthz": {"get": {"summary": "Liveness/readiness", "responses": {"200": {"description": "ok"},
                                                                              "503": {"description": "draining"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": secured,
                                 "responses": {"200": {"description": "text/plain; version=0.0.4"}}}},
            "/v1/protocol.json": {"get": {"summary": "JSON Schema of the websocket protocol",
                                          "responses": {"200": {"description": "schema"}}}},
        },
    }


def describe_openapi_path() -> dict[str, Any]:
    from hooocus_ws.describe import OPENAPI_PATH  # that module imports this one

    return OPENAPI_PATH


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())
