"""The ``list_options`` tool and the read-only resources: images, job records, options."""

from __future__ import annotations

import json
from typing import Any

from engine.core.errors import HooocusError
from hooocus_mcp._sdk import ResourceNotFoundError, ToolAnnotations
from hooocus_mcp.results import job_result
from hooocus_mcp.toolkit import ToolKit


def register(kit: ToolKit) -> None:
    backend, mcp = kit.backend, kit.mcp

    @kit.tool(annotations=ToolAnnotations(title="List options", read_only_hint=True, open_world_hint=False))
    async def list_options() -> dict[str, Any]:
        """Models, styles, samplers, schedulers, aspect ratios and performance modes you may pass to
        generate_image, with the defaults."""
        return await backend.options()

    @mcp.resource("hooocus://images/{sha256}", name="image", mime_type="image/png",
                  description="A full-size generated image (PNG unless the job asked for JPEG/WEBP).")
    async def read_image(sha256: str) -> bytes:
        stored = await backend.image(sha256)
        if stored is None or not await backend.may_read_image(sha256, kit.caller()):
            raise ResourceNotFoundError(f"no image {sha256!r} (images are kept in memory for a while)")
        return stored.data

    @mcp.resource("hooocus://jobs/{job_id}", name="job", mime_type="application/json",
                  description="A job's record: state, progress, resolved parameters, image links.")
    async def read_job(job_id: str) -> str:
        try:
            view = await backend.job(job_id, kit.caller())
        except HooocusError as exc:
            raise ResourceNotFoundError(exc.message) from None
        return job_result(view).model_dump_json()

    @mcp.resource("hooocus://options", name="options", mime_type="application/json",
                  description="The same JSON as the list_options tool.")
    async def read_options() -> str:
        return json.dumps(await backend.options())
