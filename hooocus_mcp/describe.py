"""``describe_image`` (issue 16): image → prompt, Fooocus's Describe (spec §12.5), at the MCP door.

The image is named like edit_image's: a ``hooocus://images/<sha256>`` link from an earlier result,
``sha256:<sha256>``, or a data URI. The work is the engine's Describer (bounded, cancellable, waits
for the job holding the GPU); a client that cancels the call cancels the describe.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from engine.core.errors import HooocusError
from hooocus_mcp._sdk import CallToolResult, Context, TextContent, ToolAnnotations
from hooocus_mcp.edit_image import image_ref_from_mcp
from hooocus_mcp.toolkit import ToolKit, reject_unknown_arguments, tool_error

DESCRIBE_ARGS = {"image", "mode"}


class DescribeOutput(BaseModel):
    """What describe_image returns as structured content."""

    prompt: str = Field(description="the prompt Fooocus's Describe would write")
    styles: list[str] = Field(description="the styles it would select")
    mode: str
    elapsed_s: float


def register(kit: ToolKit) -> None:
    @kit.tool(annotations=ToolAnnotations(title="Describe image", read_only_hint=True, destructive_hint=False,
                                          idempotent_hint=False, open_world_hint=False))
    async def describe_image(
        image: Annotated[str, Field(min_length=1, description="the image: hooocus://images/<sha256> from an "
                                                              "earlier result, or a data:image/png;base64 URI")],
        ctx: Context,
        mode: Annotated[Literal["photo", "anime", "both"], Field(description=(
            "photo: a caption (BLIP); anime: booru tags (WD14 tagger); both: caption, then tags"))] = "photo",
    ) -> Annotated[CallToolResult, DescribeOutput]:
        """Describe an image as a prompt (Fooocus's Describe): a caption for a photograph, booru-style tags
        for art/anime. Returns the prompt and the styles Fooocus would pick; pass them to generate_image.
        """
        reject_unknown_arguments(ctx, DESCRIBE_ARGS)
        try:
            params = {"image": image_ref_from_mcp(image, field="image"), "mode": mode}
            result = await kit.backend.describe(params, kit.caller())
        except HooocusError as exc:
            raise tool_error(exc) from None
        structured = DescribeOutput.model_validate(result).model_dump(mode="json")
        return CallToolResult(content=[TextContent(text=structured["prompt"]),
                                       TextContent(text=json.dumps(structured, separators=(",", ":")))],
                              structured_content=structured)
