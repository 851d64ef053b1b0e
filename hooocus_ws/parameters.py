"""``POST /v1/parameters``: the generation parameters stored in an image (Fooocus "Load Parameters").

The page drops a Fooocus/A1111/Hooocus image here and fills its form from the answer. One parser for
every door: this calls ``engine.io.metadata.request_from_image`` (the CLI's ``--from-image`` uses the same),
so the page does not carry a second, JavaScript reading of the metadata schemes.

Body: the raw image bytes (any Content-Type). Answer: ``{"params": {...}, "warnings": [...]}`` where
``params`` holds only the fields the metadata set (a GenerationRequest subset, JSON form). Names this
server does not have (models, LoRAs, VAEs, styles, from the runner's options) are dropped with a
warning, as Fooocus keeps its current choice, so ``params`` is always a request this server accepts.
Nothing is queued; the pixels are never decoded.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.core.errors import InvalidRequest
from hooocus_ws import http


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidRequest(f"the image is larger than {max_bytes} bytes", loc=("body",))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise InvalidRequest(f"the image is larger than {max_bytes} bytes", loc=("body",))
    if not body:
        raise InvalidRequest("the body is empty: send the image bytes", loc=("body",))
    return bytes(body)


def _names(options: dict[str, Any], key: str) -> Collection[str] | None:
    # A runner that does not list a kind (the FakeRunner has no "vaes") leaves those names unchecked.
    value = options.get(key)
    return list(value) if isinstance(value, list) else None


def parameters_from_image(runner: Any, data: bytes) -> dict[str, Any]:
    """The answer for ``data``; blocking (Pillow), so the route runs it off the event loop."""
    from engine.io.metadata import request_from_image

    options = runner.options()
    # Only a runner with a style library can recover A1111 style names from the prompt text.
    styles = getattr(runner, "styles", None)
    if not (hasattr(styles, "names") and hasattr(styles, "apply_style")):
        styles = None
    models = _names(options, "models")
    if models is not None:
        models = [*models, *(_names(options, "refiners") or [])]
    request, warnings = request_from_image(data, styles=styles, known_models=models,
                                           known_loras=_names(options, "loras"), known_vaes=_names(options, "vaes"),
                                           known_styles=_names(options, "styles"))
    return {"params": request.model_dump(mode="json", exclude_unset=True), "warnings": warnings}


@http.guarded
async def parameters(request: Request) -> Response:
    """Read an image's generation parameters; the caller must hold a valid token (nothing else is asked)."""
    ctx = http.context(request)
    http.authenticate(request)
    # The same cap as an upload: the body is one image file.
    data = await _read_body(request, ctx.runtime.settings.max_upload_bytes)
    runner = ctx.runtime.engine.runner
    return JSONResponse(await anyio.to_thread.run_sync(parameters_from_image, runner, data))
