"""The MCP surface: tools ``generate_image``, ``edit_image``, ``enhance_image``, ``describe_image``, ``get_job``, ``cancel_job``, ``list_options``
and the resources ``hooocus://images/{sha256}``, ``hooocus://jobs/{job_id}``, ``hooocus://options``
(api_anchors §11).

Results follow §11.1: one line of text, small thumbnails within a byte budget, a ``resource_link``
per full image, and ``structuredContent`` (validated against the tool's ``outputSchema``) that
never holds base64. Bad arguments become tool errors (``isError``) whose text says what to fix.

Each concern lives in its own module and registers itself on a :class:`hooocus_mcp.toolkit.ToolKit`
(the server, the backend and the shared submit/follow/render helpers): generate.py, edit_image.py,
job_tools.py, resources.py. This module only assembles them.
"""

from __future__ import annotations

from hooocus_mcp import describe, edit_image, enhance_image, generate, job_tools, resources
from hooocus_mcp._sdk import HooocusMCPServer
from hooocus_mcp.backend import Backend
from hooocus_mcp.results import CancelResult, ImageRef, JobResult, ProgressReporter, job_result, summary_line
from hooocus_mcp.toolkit import ServerOptions, ToolKit

INSTRUCTIONS = ("Text-to-image with Fooocus-quality SDXL. Call generate_image with a prompt (edit_image "
                "to vary, upscale, inpaint or outpaint an image; enhance_image to find and repaint faces, hands "
                "and other details; describe_image to turn an image into a prompt); "
                "it returns small "
                "thumbnails and hooocus://images/<sha256> links to the full images. list_options shows the "
                "styles, models, samplers and sizes you may choose.")


def package_version() -> str:
    """The installed ``hooocus`` version for ``serverInfo.version`` (clients show it and log it);
    ``engine.__version__`` when running from a checkout that was never installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("hooocus")
    except importlib.metadata.PackageNotFoundError:
        import engine

        return str(getattr(engine, "__version__", "0+unknown"))


def build_server(backend: Backend, options: ServerOptions | None = None) -> HooocusMCPServer:
    """An MCP server whose tools drive ``backend``. Transport-agnostic (stdio, HTTP, in-memory)."""
    opts = options or ServerOptions()
    mcp = HooocusMCPServer(opts.name, version=package_version(), log_level="WARNING", instructions=INSTRUCTIONS)
    kit = ToolKit(mcp, backend, opts)
    for module in (generate, edit_image, enhance_image, describe, job_tools, resources):
        module.register(kit)
    return mcp


__all__ = ["CancelResult", "ImageRef", "JobResult", "ProgressReporter", "ServerOptions",
           "build_server", "job_result", "summary_line"]
