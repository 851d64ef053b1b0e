"""The MCP surface: tools ``generate_image``, ``get_job``, ``cancel_job``, ``list_options`` and the
resources ``hooocus://images/{sha256}``, ``hooocus://jobs/{job_id}``, ``hooocus://options``
(api_anchors §11).

Results follow §11.1: one line of text, small thumbnails within a byte budget, a ``resource_link``
per full image, and ``structuredContent`` (validated against the tool's ``outputSchema``) that
never holds base64. Bad arguments become tool errors (``isError``) whose text says what to fix.
"""

from __future__ import annotations

import base64
import difflib
import inspect
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field

from engine.core.access import Principal
from engine.core.constants import (
    MAX_IMAGE_NUMBER,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE_PX,
    MIN_SIDE_PX,
    OutputFormat,
    PerformanceName,
    SamplerName,
    SchedulerName,
)
from engine.core.errors import HooocusError
from engine.core.events import Cancelled, Done, Event, Failed, Progress, Started
from engine.core.request import GenerationRequest
from hooocus_mcp._sdk import (
    CallToolResult,
    Context,
    HooocusMCPServer,
    ImageContent,
    ResourceLink,
    ResourceNotFoundError,
    TextContent,
    ToolAnnotations,
    ToolError,
    get_access_token,
)
from hooocus_mcp.backend import Backend, JobView, steps_done
from hooocus_mcp.edit_image import image_ref_from_mcp
from hooocus_mcp.thumbnails import preview_thumbnail, thumbnails_within_budget

log = logging.getLogger("hooocus.mcp")

#: Below the 60 s request timeout common in MCP clients (TS SDK default; api_anchors §6.4).
DEFAULT_WAIT_TIMEOUT_S = 45.0
MAX_WAIT_TIMEOUT_S = 600.0
DEFAULT_THUMBNAIL_SIDE_PX = 512
#: Base64 characters of all inline thumbnails together (joenorton's server uses 100k per image).
DEFAULT_INLINE_BUDGET_B64_CHARS = 600_000
NOBODY = Principal("anonymous", frozenset())


# -- result schema (outputSchema) -------------------------------------------------------------------

class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageRef(_Out):
    uri: str = Field(description="hooocus://images/<sha256>; read it as a resource for the full image")
    index: int
    seed: str = Field(description="decimal string (seeds exceed JavaScript's safe integers)")
    width: int
    height: int
    mime_type: str
    sha256: str
    size_bytes: int


class JobProgress(_Out):
    done_steps: int
    total_steps: int


class JobError(_Out):
    code: str
    message: str
    error_id: str | None = None


class Timings(_Out):
    queued_ms: int | None = None
    run_ms: int | None = None


class JobResult(_Out):
    """What generate_image and get_job return (structuredContent)."""

    job_id: str
    status: Literal["running", "completed", "cancelled", "failed"] = Field(
        description="'running' also covers a job still waiting in the queue (see queue_position)")
    queue_position: int | None = Field(None, description="jobs ahead of this one; null once it runs")
    progress: JobProgress
    images: list[ImageRef]
    seeds: list[str]
    params_resolved: dict[str, Any]
    timings: Timings
    error: JobError | None = None


class CancelResult(_Out):
    job_id: str
    cancelled: bool = Field(description="false when the job had already finished")
    status: Literal["running", "completed", "cancelled", "failed"]
    images: list[ImageRef] = Field(description="images finished before the cancel")


_STATUS_BY_STATE = {"queued": "running", "running": "running", "done": "completed", "cancelled": "cancelled",
                    "failed": "failed"}


def image_uri(sha256: str) -> str:
    return f"hooocus://images/{sha256}"


def job_result(view: JobView) -> JobResult:
    def ms(start: float | None, end: float | None) -> int | None:
        return None if start is None or end is None else max(0, round((end - start) * 1000))

    images = [ImageRef(uri=image_uri(i.sha256), index=i.index, seed=i.seed, width=i.width, height=i.height,
                       mime_type=i.mime, sha256=i.sha256, size_bytes=i.size_bytes) for i in view.images]
    error = None if view.error is None else JobError(code=str(view.error.get("code", "internal_error")),
                                                     message=str(view.error.get("message", "")),
                                                     error_id=view.error.get("error_id") or None)
    return JobResult(job_id=view.job_id, status=_STATUS_BY_STATE[view.state],  # type: ignore[arg-type]
                     queue_position=view.queue_position if view.state == "queued" else None,
                     progress=JobProgress(done_steps=view.done_steps, total_steps=view.total_steps),
                     images=images, seeds=list(view.seeds), params_resolved=view.params,
                     timings=Timings(queued_ms=ms(view.created_at, view.started_at),
                                     run_ms=ms(view.started_at, view.finished_at)),
                     error=error)


def summary_line(result: JobResult) -> str:
    """One line for the model: what happened and where the full images are."""
    n = len(result.images)
    noun = "image" if n == 1 else "images"
    uris = ", ".join(i.uri for i in result.images)
    if result.status == "completed":
        seeds = ", ".join(i.seed for i in result.images)
        took = "" if result.timings.run_ms is None else f" in {result.timings.run_ms / 1000:.1f}s"
        return f"Generated {n} {noun} (seeds {seeds}){took}. Full-size: {uris}"
    if result.status == "running":
        where = (f"queued at position {result.queue_position}" if result.queue_position is not None
                 else f"step {result.progress.done_steps}/{result.progress.total_steps}")
        return (f"Job {result.job_id} is still running ({where}); call get_job(job_id={result.job_id!r}) "
                f"to follow it or cancel_job to stop it.")
    if result.status == "cancelled":
        return f"Job {result.job_id} was cancelled after {n} {noun}." + (f" Finished: {uris}" if n else "")
    err = result.error or JobError(code="internal_error", message="")
    return f"Job {result.job_id} failed ({err.code}): {err.message}"


# -- progress -----------------------------------------------------------------------------------------

@dataclass
class ProgressReporter:
    """Turns job events into MCP progress values that strictly increase and end at the total.

    Steps are counted over all images (api_anchors §11.1); reports closer than ``min_interval_s``
    are dropped except the final one, so a fast sampler cannot flood the client.
    """

    send: Callable[[float, float | None, str | None], Any]
    min_interval_s: float = 0.25
    clock: Callable[[], float] = time.monotonic
    total: int = 0
    last_sent: int = 0
    _last_time: float = float("-inf")

    async def on_event(self, event: Event) -> None:
        if isinstance(event, Started):
            self.total = max(self.total, event.total_steps)
        elif isinstance(event, Progress):
            done = steps_done(event)
            total = self.total or event.total_steps * event.image_count
            message = (f"image {event.image_index + 1}/{event.image_count} · step {event.step}/{event.total_steps}"
                       f" · {event.stage}")
            await self._report(min(done, total), total, message)
        elif isinstance(event, Done) and self.total:
            await self._report(self.total, self.total, "done", force=True)

    async def _report(self, done: int, total: int, message: str, *, force: bool = False) -> None:
        if done <= self.last_sent:
            return
        now = self.clock()
        if not force and done < total and now - self._last_time < self.min_interval_s:
            return
        self.last_sent, self._last_time = done, now
        await self.send(float(done), float(total), message)


# -- the server ---------------------------------------------------------------------------------------

def package_version() -> str:
    """The installed ``hooocus`` version for ``serverInfo.version`` (clients show it and log it);
    ``engine.__version__`` when running from a checkout that was never installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("hooocus")
    except importlib.metadata.PackageNotFoundError:
        import engine

        return str(getattr(engine, "__version__", "0+unknown"))


def caller_of(default: Principal) -> Principal:
    """The bearer principal over HTTP (set by the SDK's auth middleware), else ``default``."""
    token = get_access_token()
    if token is None:
        return default
    return Principal(token.client_id, frozenset(token.scopes))


def _tool_error(exc: HooocusError, hint: str = "") -> ToolError:
    text = f"{exc.code}: {exc.message}"
    return ToolError(text + (f" {hint}" if hint else ""))


def _reject_unknown_arguments(ctx: Context, allowed: set[str]) -> None:
    # The SDK drops unknown keys silently; a model that misspells a parameter should hear about it.
    params = ctx.request_context.params or {}
    given = set((params.get("arguments") or {}).keys())
    unknown = sorted(given - allowed)
    if unknown:
        raise ToolError(f"invalid_request: unknown argument(s) {unknown}; valid arguments: {sorted(allowed)}")


@dataclass(frozen=True)
class ServerOptions:
    name: str = "hooocus"
    default_caller: Principal = NOBODY
    inline_budget_b64_chars: int = DEFAULT_INLINE_BUDGET_B64_CHARS
    progress_min_interval_s: float = 0.25
    default_wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S


_GENERATE_ARGS = {"prompt", "negative_prompt", "styles", "performance", "aspect_ratio", "width", "height", "seed",
                  "image_number", "sampler", "scheduler", "cfg", "sharpness", "model", "output_format",
                  "max_side_px", "wait_timeout_s", "image", "mask"}

Side = Annotated[int, Field(ge=MIN_SIDE_PX, le=MAX_SIDE_PX, multiple_of=8)]
SeedArg = Annotated[int, Field(ge=0, le=MAX_SEED)] | Annotated[str, Field(pattern=r"^\d{1,19}$")]
ThumbSide = Annotated[int, Field(ge=64, le=1024, description="longest side of the inline thumbnails, pixels")]
WaitS = Annotated[float, Field(ge=0, le=MAX_WAIT_TIMEOUT_S)]


def build_server(backend: Backend, options: ServerOptions | None = None) -> HooocusMCPServer:
    """An MCP server whose tools drive ``backend``. Transport-agnostic (stdio, HTTP, in-memory)."""
    opts = options or ServerOptions()
    mcp = HooocusMCPServer(
        opts.name, version=package_version(), log_level="WARNING",
        instructions=("Text-to-image with Fooocus-quality SDXL. Call generate_image with a prompt; it returns small "
                      "thumbnails and hooocus://images/<sha256> links to the full images. list_options shows the "
                      "styles, models, samplers and sizes you may choose."),
    )

    def tool(**kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            mcp.add_tool(fn, description=inspect.cleandoc(fn.__doc__ or ""), **kw)  # no docstring indentation
            return fn

        return register

    async def render(view: JobView, max_side_px: int) -> CallToolResult:
        result = job_result(view)
        content: list[Any] = [TextContent(text=summary_line(result))]
        if view.images:
            present = []  # an image evicted from the bounded store keeps its link, loses its thumbnail
            for info in view.images:
                stored = await backend.image(info.sha256)
                if stored is not None:
                    present.append(stored.data)
            thumbs = await anyio.to_thread.run_sync(
                lambda: thumbnails_within_budget(present, max_side_px=max_side_px,
                                                 budget_b64_chars=opts.inline_budget_b64_chars))
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

    async def follow(job_id: str, caller: Principal, ctx: Context, timeout_s: float) -> bool:
        """Stream progress until the job ends (True) or ``timeout_s`` passes (False)."""
        reporter = ProgressReporter(ctx.report_progress, min_interval_s=opts.progress_min_interval_s)
        with anyio.move_on_after(timeout_s):
            async with backend.follow(job_id, caller) as events:
                async for event in events:
                    await reporter.on_event(event)
                    if isinstance(event, Done | Cancelled | Failed):
                        return True
        return False

    async def submit(fields: dict[str, Any], caller: Principal) -> str:
        try:
            request = GenerationRequest.parse(fields)
            return await backend.submit(request, caller)
        except HooocusError as exc:
            hint = ""
            if exc.code == "unknown_style":
                index = exc.loc[1] if exc.loc and len(exc.loc) == 2 else None
                bad = fields["styles"][index] if isinstance(index, int) else ""
                close = difflib.get_close_matches(bad, (await backend.options()).get("styles", []), n=5, cutoff=0.5)
                hint = (f"Did you mean {close}? " if close else "") + "Call list_options for the valid style names."
            elif exc.code in ("unknown_model", "unknown_lora"):
                hint = "Call list_options for the installed models."
            raise _tool_error(exc, hint) from None

    @tool(annotations=ToolAnnotations(title="Generate image", read_only_hint=False, destructive_hint=False,
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
        wait_timeout_s: Annotated[WaitS | None, Field(
            description="return status 'running' with the job_id if not done by then (default 45)")] = None,
        image: Annotated[str | None, Field(description="input image: hooocus://images/<sha256> from an earlier "
                                                       "result, or a data:image/png;base64 URI")] = None,
        mask: Annotated[str | None, Field(description="inpaint mask (white = repaint), same forms as image")] = None,
    ) -> Annotated[CallToolResult, JobResult]:
        """Generate images from a text prompt with Fooocus-quality SDXL.

        Returns a one-line summary, small thumbnails, and a hooocus://images/<sha256> link per full
        image. If the job takes longer than wait_timeout_s it keeps running: follow it with get_job.
        """
        _reject_unknown_arguments(ctx, _GENERATE_ARGS)
        caller = caller_of(opts.default_caller)
        given = {"prompt": prompt, "negative_prompt": negative_prompt, "styles": styles, "performance": performance,
                 "aspect_ratio": aspect_ratio, "width": width, "height": height,
                 "seed": int(seed) if seed is not None else None, "image_number": image_number, "sampler": sampler,
                 "scheduler": scheduler, "cfg": cfg, "sharpness": sharpness, "base_model": model,
                 "output_format": output_format}
        try:
            given["input_image"] = image_ref_from_mcp(image, field="image")
            given["inpaint_mask"] = image_ref_from_mcp(mask, field="mask")
        except HooocusError as exc:
            raise _tool_error(exc) from None
        job_id = await submit({k: v for k, v in given.items() if v is not None}, caller)
        timeout_s = opts.default_wait_timeout_s if wait_timeout_s is None else wait_timeout_s
        try:
            await follow(job_id, caller, ctx, timeout_s)
        except anyio.get_cancelled_exc_class():
            # The client cancelled the call (notifications/cancelled or a closed stream): stop the
            # job too, or the GPU would keep working for nobody. Not on the wait-timeout path.
            with anyio.CancelScope(shield=True):
                await backend.cancel(job_id, caller)
            raise
        return await render(await backend.job(job_id, caller), max_side_px)

    @tool(annotations=ToolAnnotations(title="Get job", read_only_hint=True, open_world_hint=False))
    async def get_job(
        job_id: Annotated[str, Field(min_length=1, max_length=64)],
        ctx: Context,
        include_preview: Annotated[bool, Field(description="add the latest in-progress preview")] = False,
        wait_s: Annotated[float, Field(ge=0, le=DEFAULT_WAIT_TIMEOUT_S,
                                       description="wait up to this long for the job to finish")] = 0.0,
        max_side_px: ThumbSide = DEFAULT_THUMBNAIL_SIDE_PX,
    ) -> Annotated[CallToolResult, JobResult]:
        """State, progress and images of a job started by generate_image (same result as generate_image)."""
        _reject_unknown_arguments(ctx, {"job_id", "include_preview", "wait_s", "max_side_px"})
        caller = caller_of(opts.default_caller)
        try:
            if wait_s > 0:
                await follow(job_id, caller, ctx, wait_s)
            view = await backend.job(job_id, caller)
            result = await render(view, max_side_px)
            rgb = await backend.preview(job_id, caller) if include_preview and not view.finished else None
        except HooocusError as exc:
            raise _tool_error(exc) from None
        if rgb is not None:
            thumb = await anyio.to_thread.run_sync(lambda: preview_thumbnail(rgb))
            if thumb is not None:
                result.content.insert(1, ImageContent(data=base64.b64encode(thumb.data).decode("ascii"),
                                                      mime_type=thumb.mime))
        return result

    @tool(annotations=ToolAnnotations(title="Cancel job", read_only_hint=False, destructive_hint=True,
                                      idempotent_hint=True, open_world_hint=False))
    async def cancel_job(job_id: Annotated[str, Field(min_length=1, max_length=64)],
                         ctx: Context) -> Annotated[CallToolResult, CancelResult]:
        """Cancel a queued or running job. Images finished before the cancel are kept."""
        _reject_unknown_arguments(ctx, {"job_id"})
        caller = caller_of(opts.default_caller)
        try:
            cancelled = await backend.cancel(job_id, caller)
            view = await backend.job(job_id, caller)
            if cancelled and not view.finished:  # a running job stops at its next step
                with anyio.move_on_after(10):
                    async with backend.follow(job_id, caller) as events:
                        async for _ in events:
                            pass
                view = await backend.job(job_id, caller)
        except HooocusError as exc:
            raise _tool_error(exc) from None
        result = job_result(view)
        out = CancelResult(job_id=job_id, cancelled=cancelled, status=result.status, images=result.images)
        text = (f"Cancelled job {job_id}." if cancelled
                else f"Job {job_id} had already finished ({result.status}); nothing to cancel.")
        structured = out.model_dump(mode="json")
        return CallToolResult(content=[TextContent(text=text),
                                       TextContent(text=json.dumps(structured, separators=(",", ":")))],
                              structured_content=structured)

    @tool(annotations=ToolAnnotations(title="List options", read_only_hint=True, open_world_hint=False))
    async def list_options() -> dict[str, Any]:
        """Models, styles, samplers, schedulers, aspect ratios and performance modes you may pass to
        generate_image, with the defaults."""
        return await backend.options()

    @mcp.resource("hooocus://images/{sha256}", name="image", mime_type="image/png",
                  description="A full-size generated image (PNG unless the job asked for JPEG/WEBP).")
    async def read_image(sha256: str) -> bytes:
        stored = await backend.image(sha256)
        if stored is None or not await backend.may_read_image(sha256, caller_of(opts.default_caller)):
            raise ResourceNotFoundError(f"no image {sha256!r} (images are kept in memory for a while)")
        return stored.data

    @mcp.resource("hooocus://jobs/{job_id}", name="job", mime_type="application/json",
                  description="A job's record: state, progress, resolved parameters, image links.")
    async def read_job(job_id: str) -> str:
        try:
            view = await backend.job(job_id, caller_of(opts.default_caller))
        except HooocusError as exc:
            raise ResourceNotFoundError(exc.message) from None
        return job_result(view).model_dump_json()

    @mcp.resource("hooocus://options", name="options", mime_type="application/json",
                  description="The same JSON as the list_options tool.")
    async def read_options() -> str:
        return json.dumps(await backend.options())

    return mcp


__all__ = ["CancelResult", "ImageRef", "JobResult", "ProgressReporter", "ServerOptions",
           "build_server", "job_result", "summary_line"]
