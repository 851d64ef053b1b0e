"""The ``generate_image`` tool: text (and optionally an input image/mask) to images."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from engine.core.constants import (
    MAX_IMAGE_NUMBER,
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    OutputFormat,
    PerformanceName,
    SamplerName,
    SchedulerName,
)
from engine.core.errors import HooocusError
from engine.core.request import MAX_IMAGE_PROMPTS, ImagePromptType, LoraSpec
from hooocus_mcp._sdk import CallToolResult, Context, ToolAnnotations
from hooocus_mcp.edit_image import image_ref_from_mcp
from hooocus_mcp.results import JobResult
from hooocus_mcp.toolkit import (
    DEFAULT_THUMBNAIL_SIDE_PX,
    SeedArg,
    Side,
    ThumbSide,
    ToolKit,
    WaitArg,
    reject_unknown_arguments,
    tool_error,
)

GENERATE_ARGS = {"prompt", "negative_prompt", "styles", "performance", "aspect_ratio", "width", "height", "seed",
                 "image_number", "sampler", "scheduler", "cfg", "sharpness", "model", "output_format",
                 "max_side_px", "wait_timeout_s", "image", "mask", "image_prompts", "loras"}


class ImagePromptArg(BaseModel):
    """One Image Prompt slot of generate_image (the engine's ImagePromptSlot, with MCP image links)."""

    model_config = ConfigDict(extra="forbid")
    image: Annotated[str, Field(min_length=1, description="hooocus://images/<sha256> or a data:image/png;base64 URI")]
    type: Annotated[ImagePromptType, Field(description=(
        "ImagePrompt: borrow the image's content/style; FaceSwap: borrow the face (the first face found, "
        "else the whole image); PyraCanny: follow its edges; CPDS: follow its structure/depth"))] = "ImagePrompt"
    stop_at: Annotated[float | None, Field(ge=0.0, le=1.0, description=(
        "fraction of sampling it acts for; default 0.5 (FaceSwap 0.9)"))] = None
    weight: Annotated[float | None, Field(ge=0.0, le=2.0, description=(
        "strength; default ImagePrompt 0.6, FaceSwap 0.75, PyraCanny/CPDS 1.0"))] = None


def image_prompt_fields(slots: list[ImagePromptArg] | None) -> list[dict[str, object]] | None:
    """The request's ``image_prompts`` from the tool argument (links mapped, field path kept)."""
    if slots is None:
        return None
    return [{**slot.model_dump(exclude_none=True), "image": image_ref_from_mcp(slot.image, field="image_prompts")}
            for slot in slots]


def register(kit: ToolKit) -> None:
    @kit.tool(annotations=ToolAnnotations(title="Generate image", read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False, open_world_hint=False))
    async def generate_image(
        prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw")],
        ctx: Context,
        negative_prompt: Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)] = None,
        styles: Annotated[list[str] | None, Field(
            description="style names from list_options (default: Fooocus V2, Enhance, Sharp)")] = None,
        performance: Annotated[PerformanceName | None, Field(description="default Speed (30 steps)")] = None,
        aspect_ratio: Annotated[str | None, Field(
            description="'W*H' from list_options, e.g. '1152*896' (default); ignored if width/height given")] = None,
        width: Annotated[Side | None, Field(description="pixels, multiple of 8; give with height")] = None,
        height: Annotated[Side | None, Field(description="pixels, multiple of 8; give with width")] = None,
        seed: Annotated[SeedArg | None, Field(description="default random; image i uses seed + i")] = None,
        image_number: Annotated[int | None, Field(ge=1, le=MAX_IMAGE_NUMBER, description="default 1")] = None,
        sampler: SamplerName | None = None,
        scheduler: SchedulerName | None = None,
        cfg: Annotated[float | None, Field(ge=1.0, le=30.0, description="guidance scale, default 4")] = None,
        sharpness: Annotated[float | None, Field(ge=0.0, le=30.0, description="default 2")] = None,
        model: Annotated[str | None, Field(description="base model name from list_options")] = None,
        output_format: OutputFormat | None = None,
        max_side_px: ThumbSide = DEFAULT_THUMBNAIL_SIDE_PX,
        wait_timeout_s: WaitArg = None,
        image: Annotated[str | None, Field(description="input image: hooocus://images/<sha256> from an earlier "
                                                       "result, or a data:image/png;base64 URI")] = None,
        mask: Annotated[str | None, Field(description="inpaint mask (white = repaint), same forms as image")] = None,
        image_prompts: Annotated[list[ImagePromptArg] | None, Field(
            max_length=MAX_IMAGE_PROMPTS, description="up to 4 reference images that guide the result "
                                                      "(Fooocus Image Prompt)")] = None,
        # The request's own LoRA slot type, so the tool validates exactly as HTTP and the websocket do.
        loras: Annotated[list[LoraSpec] | None, Field(
            max_length=MAX_LORAS, description="LoRAs from list_options 'loras' (for the chosen model's family: "
                                              "'families'), each {name, weight}; applied for this job only")] = None,
    ) -> Annotated[CallToolResult, JobResult]:
        """Generate images from a text prompt with Fooocus-quality SDXL.

        Returns a one-line summary, small thumbnails, and a hooocus://images/<sha256> link per full
        image. If the job takes longer than wait_timeout_s it keeps running: follow it with get_job.
        """
        reject_unknown_arguments(ctx, GENERATE_ARGS)
        given = {"prompt": prompt, "negative_prompt": negative_prompt, "styles": styles, "performance": performance,
                 "aspect_ratio": aspect_ratio, "width": width, "height": height,
                 "seed": int(seed) if seed is not None else None, "image_number": image_number, "sampler": sampler,
                 "scheduler": scheduler, "cfg": cfg, "sharpness": sharpness, "base_model": model,
                 "output_format": output_format}
        try:
            given["input_image"] = image_ref_from_mcp(image, field="image")
            given["inpaint_mask"] = image_ref_from_mcp(mask, field="mask")
            given["image_prompts"] = image_prompt_fields(image_prompts)
            given["loras"] = [lora.model_dump() for lora in loras] if loras is not None else None
        except HooocusError as exc:
            raise tool_error(exc) from None
        return await kit.run_job(given, ctx, wait_timeout_s=wait_timeout_s, max_side_px=max_side_px)
