"""The MCP ``enhance_image`` tool (issue 16): Fooocus's Enhance on an image an agent already has.

Each tab finds a region (GroundingDINO + SAM from a detection text such as "face" or "hand", or a
rembg model) and repaints it with its own prompt; an optional Upscale/Vary runs before the first or
after the last tab. The tab fields are the engine's own (:class:`engine.core.request.EnhanceTab`), so
the tool's schema and the websocket/HTTP ``enhance`` field agree. It runs the job as ``edit_image``
does (:meth:`hooocus_mcp.toolkit.ToolKit.run_job`: progress, cancel on a cancelled call, thumbnails).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from engine.core.constants import MAX_PROMPT_CHARS, OutputFormat, PerformanceName
from engine.core.errors import HooocusError
from engine.core.request import (
    MAX_ENHANCE_TABS,
    UOV_DISABLED,
    EnhanceTab,
    EnhanceUovOrder,
    EnhanceUovPromptType,
    UovMethod,
)
from hooocus_mcp._sdk import CallToolResult, Context, ToolAnnotations
from hooocus_mcp.edit_image import image_ref_from_mcp
from hooocus_mcp.results import JobResult
from hooocus_mcp.toolkit import (
    DEFAULT_THUMBNAIL_SIDE_PX,
    SeedArg,
    ThumbSide,
    ToolKit,
    WaitArg,
    reject_unknown_arguments,
    tool_error,
)

ENHANCE_ARGS = {"image", "tabs", "uov_method", "uov_processing_order", "uov_prompt_type", "save_only_final",
                "prompt", "negative_prompt", "seed", "performance", "output_format", "max_side_px", "wait_timeout_s"}


def enhance_fields(image: str, tabs: list[EnhanceTab], *, uov_method: str, uov_processing_order: str,
                   uov_prompt_type: str, save_only_final: bool) -> dict[str, Any]:
    """The request fields of one ``enhance_image`` call: enhance-only on ``image``."""
    return {"input_image": image_ref_from_mcp(image, field="image"),
            "enhance": {"tabs": [tab.model_dump() for tab in tabs], "uov_method": uov_method,
                        "uov_processing_order": uov_processing_order, "uov_prompt_type": uov_prompt_type,
                        "save_only_final": save_only_final}}


def register(kit: ToolKit) -> None:
    @kit.tool(annotations=ToolAnnotations(title="Enhance image", read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False, open_world_hint=False))
    async def enhance_image(
        image: Annotated[str, Field(min_length=1, description="the image to enhance: hooocus://images/<sha256> "
                                                              "from an earlier result, or a data:image/png;base64 URI")],
        ctx: Context,
        tabs: Annotated[list[EnhanceTab], Field(max_length=MAX_ENHANCE_TABS, description=(
            "up to 5 passes, in order; each: detection_prompt (what to find, e.g. 'face', 'hand', 'eyes'), prompt "
            "(what to paint there, e.g. 'detailed face'; empty = the main prompt), and optional mask/inpaint "
            "settings"))] = [],  # noqa: B006 (the SDK copies defaults; a tuple would change the schema type)
        uov_method: Annotated[UovMethod, Field(description="optional upscale or variation with the passes")]
        = UOV_DISABLED,
        uov_processing_order: EnhanceUovOrder = "Before First Enhancement",
        uov_prompt_type: EnhanceUovPromptType = "Original Prompts",
        save_only_final: Annotated[bool, Field(description="return only the final image")] = False,
        prompt: Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS,
                                            description="the main prompt (used by passes without their own)")] = None,
        negative_prompt: Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)] = None,
        seed: Annotated[SeedArg | None, Field(description="default random; every pass uses this seed")] = None,
        performance: Annotated[PerformanceName | None, Field(description="default Speed")] = None,
        output_format: OutputFormat | None = None,
        max_side_px: ThumbSide = DEFAULT_THUMBNAIL_SIDE_PX,
        wait_timeout_s: WaitArg = None,
    ) -> Annotated[CallToolResult, JobResult]:
        """Enhance an image with Fooocus's Enhance: find regions by text (face, hands, eyes, ...) and repaint
        each with its own prompt, optionally upscaling or varying before or after.

        Returns what edit_image returns: a summary, small thumbnails and hooocus://images/<sha256> links
        (each pass's result, unless save_only_final). If it takes longer than wait_timeout_s it keeps running:
        follow it with get_job.
        """
        reject_unknown_arguments(ctx, ENHANCE_ARGS)
        try:
            task = enhance_fields(image, tabs, uov_method=uov_method, uov_processing_order=uov_processing_order,
                                  uov_prompt_type=uov_prompt_type, save_only_final=save_only_final)
        except HooocusError as exc:
            raise tool_error(exc) from None
        given = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": int(seed) if seed is not None else None,
                 "performance": performance, "output_format": output_format, **task}
        return await kit.run_job(given, ctx, wait_timeout_s=wait_timeout_s, max_side_px=max_side_px)
