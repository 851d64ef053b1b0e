"""The ``get_job`` and ``cancel_job`` tools: follow and stop a job an image tool started."""

from __future__ import annotations

import base64
import json
from typing import Annotated

import anyio
from pydantic import Field

from engine.core.errors import HooocusError
from hooocus_mcp._sdk import CallToolResult, Context, ImageContent, TextContent, ToolAnnotations
from hooocus_mcp.results import CancelResult, JobResult, job_result
from hooocus_mcp.thumbnails import preview_thumbnail
from hooocus_mcp.toolkit import (
    DEFAULT_THUMBNAIL_SIDE_PX,
    DEFAULT_WAIT_TIMEOUT_S,
    ThumbSide,
    ToolKit,
    reject_unknown_arguments,
    tool_error,
)

#: How long cancel_job waits for a running job to reach its next step and stop.
CANCEL_SETTLE_TIMEOUT_S = 10.0


def register(kit: ToolKit) -> None:
    backend = kit.backend

    @kit.tool(annotations=ToolAnnotations(title="Get job", read_only_hint=True, open_world_hint=False))
    async def get_job(
        job_id: Annotated[str, Field(min_length=1, max_length=64)],
        ctx: Context,
        include_preview: Annotated[bool, Field(description="add the latest in-progress preview")] = False,
        wait_s: Annotated[float, Field(ge=0, le=DEFAULT_WAIT_TIMEOUT_S,
                                       description="wait up to this long for the job to finish")] = 0.0,
        max_side_px: ThumbSide = DEFAULT_THUMBNAIL_SIDE_PX,
    ) -> Annotated[CallToolResult, JobResult]:
        """State, progress and images of a job started by generate_image (same result as generate_image)."""
        reject_unknown_arguments(ctx, {"job_id", "include_preview", "wait_s", "max_side_px"})
        caller = kit.caller()
        try:
            if wait_s > 0:
                await kit.follow(job_id, caller, ctx, wait_s)
            view = await backend.job(job_id, caller)
            result = await kit.render(view, max_side_px)
            rgb = await backend.preview(job_id, caller) if include_preview and not view.finished else None
        except HooocusError as exc:
            raise tool_error(exc) from None
        if rgb is not None:
            thumb = await anyio.to_thread.run_sync(lambda: preview_thumbnail(rgb))
            if thumb is not None:
                result.content.insert(1, ImageContent(data=base64.b64encode(thumb.data).decode("ascii"),
                                                      mime_type=thumb.mime))
        return result

    @kit.tool(annotations=ToolAnnotations(title="Cancel job", read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=True, open_world_hint=False))
    async def cancel_job(job_id: Annotated[str, Field(min_length=1, max_length=64)],
                         ctx: Context) -> Annotated[CallToolResult, CancelResult]:
        """Cancel a queued or running job. Images finished before the cancel are kept."""
        reject_unknown_arguments(ctx, {"job_id"})
        caller = kit.caller()
        try:
            cancelled = await backend.cancel(job_id, caller)
            view = await backend.job(job_id, caller)
            if cancelled and not view.finished:  # a running job stops at its next step
                with anyio.move_on_after(CANCEL_SETTLE_TIMEOUT_S):
                    async with backend.follow(job_id, caller) as events:
                        async for _ in events:
                            pass
                view = await backend.job(job_id, caller)
        except HooocusError as exc:
            raise tool_error(exc) from None
        result = job_result(view)
        out = CancelResult(job_id=job_id, cancelled=cancelled, status=result.status, images=result.images)
        text = (f"Cancelled job {job_id}." if cancelled
                else f"Job {job_id} had already finished ({result.status}); nothing to cancel.")
        structured = out.model_dump(mode="json")
        return CallToolResult(content=[TextContent(text=text),
                                       TextContent(text=json.dumps(structured, separators=(",", ":")))],
                              structured_content=structured)
