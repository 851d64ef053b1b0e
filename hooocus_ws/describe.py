"""Describe (image → prompt, issue 16) at the websocket door: ``POST /v1/describe`` and the
``describe`` message. The work is the engine's :class:`~engine.describe.service.Describer` (bounded,
cancellable, waits for the running job's device lock); this module only maps it to the wire.

Scope: the same as generating (``generate``): a describe runs a model on the server's device.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.core.access import Principal, may_generate
from engine.core.errors import Forbidden, HooocusError, InvalidRequest
from engine.core.inputs import base64_cap
from hooocus_ws.context import ServerContext
from hooocus_ws.http import authenticate, context, guarded, read_json_body
from hooocus_ws.protocol import CancelMessage, DescribeMessage

log = logging.getLogger("hooocus.describe")


def describer_for(ctx: ServerContext, principal: Principal) -> Any:
    if not may_generate(principal):
        raise Forbidden("this token may not describe images (scope 'generate' missing)")
    describer = ctx.runtime.describer
    if describer is None:
        raise InvalidRequest("this server does not describe images")
    return describer


@guarded
async def describe(request: Request) -> Response:
    """``{image, mode}`` → ``{prompt, styles, mode, elapsed_s}``; waits for the answer (bounded by
    the HTTP wait limit; past it the describe is cancelled and the answer is ``cancelled``)."""
    ctx = context(request)
    principal = authenticate(request)
    describer = describer_for(ctx, principal)
    body = await read_json_body(request, ctx.limits.max_http_body_bytes
                                + base64_cap(ctx.runtime.settings.max_upload_bytes))
    result = await describer.describe_async(body, owner=principal.name, timeout_s=ctx.limits.http_wait_timeout_s)
    return JSONResponse(result.to_dict())


OPENAPI_PATH = {"post": {
    "summary": "Describe an image (image → prompt, Fooocus's Describe): {image: 'sha256:<hex>' or a data URI, "
               "mode: photo|anime|both} → {prompt, styles, mode, elapsed_s}",
    "security": [{"bearer": []}],
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": False, "required": ["image"],
        "properties": {"image": {"type": "string"},
                       "mode": {"type": "string", "enum": ["photo", "anime", "both"], "default": "photo"}}}}}},
    "responses": {"200": {"description": "{prompt, styles, mode, elapsed_s}"},
                  **{code: {"description": "error"} for code in ("401", "403", "404", "409", "413", "422", "429")}}}}


# -- websocket ------------------------------------------------------------------------------------


async def start(session: Any, msg: DescribeMessage) -> None:
    """Submit (image decoded off the loop), ``ack`` with the describe id, answer when it ends.

    The read loop does not wait for the answer, so a ``cancel`` on this connection is read meanwhile."""
    describer = describer_for(session.ctx, session.principal)
    params = {"image": msg.image, "mode": msg.mode}
    task = await asyncio.to_thread(describer.submit, params, owner=session.principal.name)
    session._push({"type": "ack", "re": msg.id, "job_id": task.task_id, "state": "running"})

    async def answer() -> None:
        try:
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(task.future)), describer.timeout_s)
            session._push({"type": "describe_result", "re": msg.id, "describe_id": task.task_id, **result.to_dict()})
        except TimeoutError:
            task.cancel("timeout")
            session._send_error(msg.id, "cancelled", "the describe was cancelled (timeout)",
                                details={"describe_id": task.task_id})
        except HooocusError as exc:
            session._send_error(msg.id, exc.code, exc.message, loc=exc.loc,
                                details={"describe_id": task.task_id, **(exc.details or {})}
                                if isinstance(exc.details, dict) or exc.details is None else exc.details)
        except asyncio.CancelledError:
            task.cancel("disconnect")
            raise
        except Exception:
            error_id = secrets.token_hex(6)
            log.exception("describe answer failed (error_id %s)", error_id)
            session._send_error(msg.id, "internal_error", f"internal error (error_id {error_id})", error_id=error_id)
        finally:
            session._describes.pop(task.task_id, None)

    session._describes[task.task_id] = (task, asyncio.get_running_loop().create_task(answer()))


def cancel(session: Any, msg: CancelMessage) -> bool:
    """Cancel one of this connection's describes; False when ``job_id`` is not one (a job, then)."""
    entry = session._describes.get(msg.job_id)
    if entry is None:
        return False
    entry[0].cancel("user")
    session._push({"type": "ack", "re": msg.id, "job_id": msg.job_id, "state": "running"})
    return True


def cancel_all(session: Any) -> None:
    """The connection is gone: nobody will read the answers."""
    for task, waiter in list(session._describes.values()):
        task.cancel("disconnect")
        waiter.cancel()
    session._describes.clear()
