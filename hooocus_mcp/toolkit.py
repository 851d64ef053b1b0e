"""The helpers every MCP tool shares, held by one small context object (:class:`ToolKit`).

A tool module registers its tools with ``register(kit)``; the kit gives it the server to add to,
the caller, and the job life cycle that generate_image and edit_image both run: submit (with hints
for the mistakes models make), follow (progress notifications), cancel when the client gives up,
and render (summary, budgeted thumbnails, links, structured content).
"""

from __future__ import annotations

import base64
import difflib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from pydantic import Field

from engine.core.access import Principal
from engine.core.constants import MAX_SEED, MAX_SIDE_PX, MIN_SIDE_PX
from engine.core.errors import HooocusError
from engine.core.events import Cancelled, Done, Failed
from engine.core.request import GenerationRequest
from hooocus_mcp._sdk import (
    CallToolResult,
    Context,
    HooocusMCPServer,
    ImageContent,
    ResourceLink,
    TextContent,
    ToolError,
    get_access_token,
)
from hooocus_mcp.backend import Backend, JobView
from hooocus_mcp.results import ProgressReporter, job_result, summary_line
from hooocus_mcp.thumbnails import thumbnails_within_budget

#: Below the 60 s request timeout common in MCP clients (TS SDK default; api_anchors §6.4).
DEFAULT_WAIT_TIMEOUT_S = 45.0
MAX_WAIT_TIMEOUT_S = 600.0
DEFAULT_THUMBNAIL_SIDE_PX = 512
#: Base64 characters of all inline thumbnails together (joenorton's server uses 100k per image).
DEFAULT_INLINE_BUDGET_B64_CHARS = 600_000
NOBODY = Principal("anonymous", frozenset())

Side = Annotated[int, Field(ge=MIN_SIDE_PX, le=MAX_SIDE_PX, multiple_of=8)]
SeedArg = Annotated[int, Field(ge=0, le=MAX_SEED)] | Annotated[str, Field(pattern=r"^\d{1,19}$")]
ThumbSide = Annotated[int, Field(ge=64, le=1024, description="longest side of the inline thumbnails, pixels")]
WaitS = Annotated[float, Field(ge=0, le=MAX_WAIT_TIMEOUT_S)]
#: The job tools' ``wait_timeout_s`` argument (None: the kit's ``default_wait_timeout_s``).
WaitArg = Annotated[WaitS | None, Field(
    description=f"return status 'running' with the job_id if not done by then (default {DEFAULT_WAIT_TIMEOUT_S:g})")]


@dataclass(frozen=True)
class ServerOptions:
    name: str = "hooocus"
    default_caller: Principal = NOBODY
    inline_budget_b64_chars: int = DEFAULT_INLINE_BUDGET_B64_CHARS
    progress_min_interval_s: float = 0.25
    default_wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S


def tool_error(exc: HooocusError, hint: str = "") -> ToolError:
    text = f"{exc.code}: {exc.message}"
    if exc.loc:  # the field path, as HTTP and the websocket give it (an agent fixes that argument)
        text += f" (at {'.'.join(str(part) for part in exc.loc)})"
    return ToolError(text + (f" {hint}" if hint else ""))


def reject_unknown_arguments(ctx: Context, allowed: set[str]) -> None:
    # The SDK drops unknown keys silently; a model that misspells a parameter should hear about it.
    params = ctx.request_context.params or {}
    given = set((params.get("arguments") or {}).keys())
    unknown = sorted(given - allowed)
    if unknown:
        raise ToolError(f"invalid_request: unknown argument(s) {unknown}; valid arguments: {sorted(allowed)}")


@dataclass(frozen=True)
class ToolKit:
    """The server being built, the backend its tools drive, and the shared job helpers."""

    mcp: HooocusMCPServer
    backend: Backend
    opts: ServerOptions

    def tool(self, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a tool; its docstring (dedented) is its description."""
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.mcp.add_tool(fn, description=inspect.cleandoc(fn.__doc__ or ""), **kw)
            return fn

        return register

    def caller(self) -> Principal:
        """The bearer principal over HTTP (set by the SDK's auth middleware), else the default."""
        token = get_access_token()
        if token is None:
            return self.opts.default_caller
        return Principal(token.client_id, frozenset(token.scopes))

    async def render(self, view: JobView, max_side_px: int) -> CallToolResult:
        result = job_result(view)
        content: list[Any] = [TextContent(text=summary_line(result))]
        if view.images:
            present = []  # an image evicted from the bounded store keeps its link, loses its thumbnail
            for info in view.images:
                stored = await self.backend.image(info.sha256)
                if stored is not None:
                    present.append(stored.data)
            thumbs = await anyio.to_thread.run_sync(
                lambda: thumbnails_within_budget(present, max_side_px=max_side_px,
                                                 budget_b64_chars=self.opts.inline_budget_b64_chars))
            for thumb in thumbs:
                if thumb is not None:
                    content.append(ImageContent(data=base64.b64encode(thumb.data).decode("ascii"),
                                                mime_type=thumb.mime))
            if sum(t is None for t in thumbs):
                content.append(TextContent(text=f"{sum(t is None for t in thumbs)} thumbnail(s) left out to stay "
                                                "within the inline size budget; read the links instead."))
        for ref in result.images:
            content.append(ResourceLink(uri=ref.uri, name=f"{view.job_id}-{ref.index}.{ref.mime_type.split('/')[-1]}",
                                        mime_type=ref.mime_type, size=ref.size_bytes,
                                        description=f"seed {ref.seed}, {ref.width}x{ref.height}"))
        structured = result.model_dump(mode="json")
        # Spec 2025-06-18: also mirror structured content as JSON text (compact; never base64).
        content.append(TextContent(text=json.dumps(structured, separators=(",", ":"))))
        return CallToolResult(content=content, structured_content=structured, is_error=result.status == "failed")

    async def follow(self, job_id: str, caller: Principal, ctx: Context, timeout_s: float) -> bool:
        """Stream progress until the job ends (True) or ``timeout_s`` passes (False)."""
        reporter = ProgressReporter(ctx.report_progress, min_interval_s=self.opts.progress_min_interval_s)
        with anyio.move_on_after(timeout_s):
            async with self.backend.follow(job_id, caller) as events:
                async for event in events:
                    await reporter.on_event(event)
                    if isinstance(event, Done | Cancelled | Failed):
                        return True
        return False

    async def submit(self, fields: dict[str, Any], caller: Principal) -> str:
        try:
            request = GenerationRequest.parse(fields)
            return await self.backend.submit(request, caller)
        except HooocusError as exc:
            hint = ""
            if exc.code == "unknown_style":
                index = exc.loc[1] if exc.loc and len(exc.loc) == 2 else None
                bad = fields["styles"][index] if isinstance(index, int) else ""
                names = (await self.backend.options()).get("styles", [])
                close = difflib.get_close_matches(bad, names, n=5, cutoff=0.5)
                hint = (f"Did you mean {close}? " if close else "") + "Call list_options for the valid style names."
            elif exc.code in ("unknown_model", "unknown_lora"):
                hint = "Call list_options for the installed models."
            raise tool_error(exc, hint) from None

    async def run_job(self, fields: dict[str, Any], ctx: Context, *, wait_timeout_s: float | None,
                      max_side_px: int) -> CallToolResult:
        """Submit ``fields`` (None values dropped) as the caller, follow the job with progress until
        it ends or the wait times out, and render it. A client that cancels the call cancels the job."""
        caller = self.caller()
        job_id = await self.submit({k: v for k, v in fields.items() if v is not None}, caller)
        timeout_s = self.opts.default_wait_timeout_s if wait_timeout_s is None else wait_timeout_s
        try:
            await self.follow(job_id, caller, ctx, timeout_s)
        except anyio.get_cancelled_exc_class():
            # The client cancelled the call (notifications/cancelled or a closed stream): stop the
            # job too, or the GPU would keep working for nobody. Not on the wait-timeout path.
            with anyio.CancelScope(shield=True):
                await self.backend.cancel(job_id, caller)
            raise
        return await self.render(await self.backend.job(job_id, caller), max_side_px)
