"""Image inputs at the MCP door (issue 14): image references, and the focused ``edit_image`` tool.

An agent names an input image by the link an earlier call gave it (``hooocus://images/<sha256>``),
by ``sha256:<sha256>``, or by a data URI; :func:`image_ref_from_mcp` maps the link to the engine's
reference form (engine/core/inputs.py), which then checks ownership and decodes at submit.

``edit_image`` is the agent-sized face of Fooocus's image tasks: one ``mode`` instead of Fooocus's
``uov_method`` / inpaint / outpaint fields (contract14.md). It runs the job exactly as
generate_image does (:meth:`hooocus_mcp.toolkit.ToolKit.run_job`: progress, cancel on a cancelled
call, budgeted thumbnails).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field

from engine.core.constants import MAX_IMAGE_NUMBER, MAX_PROMPT_CHARS, OutputFormat, PerformanceName
from engine.core.errors import HooocusError, InvalidRequest
from hooocus_mcp._sdk import CallToolResult, Context, ToolAnnotations
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

_LINK_RE = re.compile(r"^hooocus://images/([0-9a-fA-F]{64})(?:\.[a-z]{3,4})?$")

EditMode = Literal["vary_subtle", "vary_strong", "upscale_1.5x", "upscale_2x", "upscale_fast_2x", "inpaint",
                   "outpaint"]
OutpaintSide = Literal["left", "right", "top", "bottom"]

#: mode -> Fooocus's uov_method (its own strings, contract14.md); inpaint/outpaint run with it Disabled.
UOV_METHOD_BY_MODE: dict[str, str] = {
    "vary_subtle": "Vary (Subtle)",
    "vary_strong": "Vary (Strong)",
    "upscale_1.5x": "Upscale (1.5x)",
    "upscale_2x": "Upscale (2x)",
    "upscale_fast_2x": "Upscale (Fast 2x)",
}

EDIT_ARGS = {"image", "mode", "prompt", "mask", "outpaint", "negative_prompt", "seed", "image_number",
             "performance", "output_format", "max_side_px", "wait_timeout_s"}


def image_ref_from_mcp(value: str | None, *, field: str) -> str | None:
    """``hooocus://images/<sha>`` → ``sha256:<sha>``; other strings pass through to the engine,
    which validates them; a malformed hooocus:// link is ``invalid_request`` at ``field``."""
    if value is None:
        return None
    match = _LINK_RE.match(value)
    if match:
        return f"sha256:{match.group(1).lower()}"
    if value.startswith("hooocus://"):
        raise InvalidRequest(f"{field}: not an image link: use hooocus://images/<sha256> from an earlier result",
                             loc=(field,))
    return value


def edit_fields(mode: str, *, image: str, mask: str | None, outpaint: list[str] | None) -> dict[str, Any]:
    """The request fields of one ``edit_image`` call's image task (contract14.md names and values).

    Fooocus runs Vary/Upscale whenever uov_method is set and then ignores any mask or outpaint, so
    a mask or outpaint with those modes is refused rather than silently dropped; inpaint needs a
    mask and outpaint needs sides, or Fooocus would have nothing to do with the image.
    """
    fields: dict[str, Any] = {"input_image": image_ref_from_mcp(image, field="image")}
    if mode in UOV_METHOD_BY_MODE:
        for name, value in (("mask", mask), ("outpaint", outpaint)):
            if value:
                raise InvalidRequest(f"{name}: not used by mode {mode!r}; give it with mode 'inpaint' or 'outpaint'",
                                     loc=(name,))
        fields["uov_method"] = UOV_METHOD_BY_MODE[mode]
        return fields
    if mode == "inpaint" and mask is None:
        raise InvalidRequest("mask: mode 'inpaint' needs a mask (white = repaint)", loc=("mask",))
    if mode == "outpaint" and not outpaint:
        raise InvalidRequest("outpaint: mode 'outpaint' needs the sides to extend, e.g. ['left', 'top']",
                             loc=("outpaint",))
    fields["inpaint_mask"] = image_ref_from_mcp(mask, field="mask")
    # Fooocus's order and spelling of the sides; a side named twice counts once.
    fields["outpaint_selections"] = [side.title() for side in ("left", "right", "top", "bottom")
                                     if side in (outpaint or ())]
    return fields


def register(kit: ToolKit) -> None:
    @kit.tool(annotations=ToolAnnotations(title="Edit image", read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False, open_world_hint=False))
    async def edit_image(
        image: Annotated[str, Field(min_length=1, description="the image to edit: hooocus://images/<sha256> from "
                                                              "an earlier result, or a data:image/png;base64 URI")],
        mode: Annotated[EditMode, Field(description=(
            "vary_subtle/vary_strong: a variation; upscale_1.5x/upscale_2x: upscale and re-detail; "
            "upscale_fast_2x: upscale only; inpaint: repaint where mask is white; outpaint: extend the sides"))],
        ctx: Context,
        prompt: Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS,
                                            description="what the result should show (optional)")] = None,
        mask: Annotated[str | None, Field(description="mode inpaint (optional for outpaint): white = repaint, "
                                                      "same forms as image")] = None,
        outpaint: Annotated[list[OutpaintSide] | None, Field(
            min_length=1, max_length=4, description="mode outpaint: the sides to extend")] = None,
        negative_prompt: Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)] = None,
        seed: Annotated[SeedArg | None, Field(description="default random; image i uses seed + i")] = None,
        image_number: Annotated[int | None, Field(ge=1, le=MAX_IMAGE_NUMBER, description="default 1")] = None,
        performance: Annotated[PerformanceName | None, Field(description="default Speed")] = None,
        output_format: OutputFormat | None = None,
        max_side_px: ThumbSide = DEFAULT_THUMBNAIL_SIDE_PX,
        wait_timeout_s: WaitArg = None,
    ) -> Annotated[CallToolResult, JobResult]:
        """Edit an image with Fooocus-quality SDXL: vary it, upscale it, inpaint under a mask, or outpaint.

        Returns what generate_image returns: a summary, small thumbnails and hooocus://images/<sha256>
        links. If the job takes longer than wait_timeout_s it keeps running: follow it with get_job.
        """
        reject_unknown_arguments(ctx, EDIT_ARGS)
        try:
            task = edit_fields(mode, image=image, mask=mask, outpaint=outpaint)
        except HooocusError as exc:
            raise tool_error(exc) from None
        given = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": int(seed) if seed is not None else None,
                 "image_number": image_number, "performance": performance, "output_format": output_format, **task}
        return await kit.run_job(given, ctx, wait_timeout_s=wait_timeout_s, max_side_px=max_side_px)
