"""``hooocus mcp``: the MCP server on stdio, for agent hosts that launch it themselves.

Two modes (api_anchors §11.3): embedded (this process owns an engine: ``--model NAME|demo``) or
proxy (``--connect ws://host:port/v1/ws`` forwards to a running ``hooocus serve``, with the token
read from the environment variable named by ``--token-env``). stdout carries MCP messages only;
every log line goes to stderr. stdin lines are capped (``mcp_stdio_max_line_bytes``) and malformed
JSON-RPC is answered or logged (:mod:`hooocus_mcp.stdio`).

Embedded mode keeps its work in the data folder, as ``hooocus serve`` and ``hooocus generate`` do
(``engine.core.runtime.create_runtime``): the job history (``<data_dir>/history.sqlite3``, images
also in the output folder) and the image store's folder (``<data_dir>/images``). Hosts such as the MCP Inspector start one process per call, so the next
process must still answer ``get_job`` and ``hooocus://images/<sha256>`` for a job an earlier one
ran. When stdin closes, the running job gets ``shutdown_grace_s`` to finish and be recorded.

The product CLI (``hooocus.cli``) adds the sub-command (:func:`add_parser`), builds the settings and
the logging, and calls :func:`run` with the websocket client for proxy mode: this package never
imports the websocket door (nor the product CLI).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import anyio

from engine.core.access import Principal
from engine.core.errors import UsageError
from hooocus_mcp.tools import ServerOptions, build_server

#: stdio has no authentication: the trust boundary is the host process that launched us.
STDIO_CALLER = Principal("stdio", frozenset({"generate", "cancel:own"}))


class ClientConnector(Protocol):
    """Opens a hooocus.v1 client to ``url`` (proxy mode). The product CLI passes
    ``hooocus_ws.client.HooocusClient.connect``: this package never imports the websocket door."""

    def __call__(self, url: str, token: str, *, timeout_s: float) -> Awaitable[Any]: ...


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``mcp`` sub-command to the ``hooocus`` parser (handler in ``func``: :func:`run`)."""
    p = subparsers.add_parser("mcp", help="serve MCP on stdio (embedded engine, or --connect to 'hooocus serve')")
    p.add_argument("--model", help="model name, path, HF repo id, or 'demo' (embedded mode)")
    p.add_argument("--connect", metavar="URL", help="ws://host:port/v1/ws of a running 'hooocus serve' to forward to")
    p.add_argument("--token-env", default="HOOOCUS_TOKEN", metavar="NAME",
                   help="environment variable holding the token for --connect (default HOOOCUS_TOKEN)")
    p.add_argument("--config", type=Path, help="hooocus.toml to read (default: ./hooocus.toml)")
    p.add_argument("--data-dir", type=Path, help="data folder (models, outputs, history)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--model-memory-gb", type=float, metavar="GB",
                   help="memory each device may keep loaded models in, least recently used out first (default: GPU total minus max(4 GiB, 25%%); CPU: half the RAM)")
    p.add_argument("--low-vram", dest="low_vram", action="store_const", const=True,
                   help="keep weights in CPU memory and stream them to the GPU as used (SDXL and FLUX.1 on small cards)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, settings: Any, *, connect_client: ClientConnector | None = None) -> int:
    """``hooocus mcp``. The caller has configured logging to stderr (stdout is the MCP channel).
    ``connect_client`` is needed for ``--connect`` only."""
    if args.connect:
        if args.model:
            raise UsageError("hooocus mcp: --model and --connect exclude each other (the server owns the model)")
        token = os.environ.get(args.token_env, "")
        if not token:
            raise UsageError(f"hooocus mcp: --connect needs a token in ${args.token_env}")
        if connect_client is None:
            raise UsageError("hooocus mcp: --connect is not available in this build (no websocket client)")
        from hooocus_mcp.remote import RemoteBackend

        backend = RemoteBackend.for_url(args.connect, token, connect_client=connect_client)
        anyio.run(serve_stdio_remote, backend, settings.mcp_stdio_max_line_bytes)
        return 0
    from engine.core.runtime import create_runtime

    serve_embedded(create_runtime(settings, model=args.model))
    return 0


def serve_embedded(runtime: Any) -> None:
    """Embedded mode over a built (not started) runtime, which records jobs and images in the data
    folder (``create_runtime``): serve until stdin closes, give the running job ``shutdown_grace_s``,
    close everything (the history last, so it records how those jobs ended)."""
    runtime.start()
    try:
        serve_stdio_local(runtime, history=runtime.history)
    finally:
        runtime.close(grace_s=runtime.settings.shutdown_grace_s)


def serve_stdio_local(runtime: Any, *, history: Any = None) -> None:
    """Serve MCP on stdin/stdout over ``runtime`` until stdin closes. ``history`` (a
    :class:`engine.core.history.JobHistory`) answers for jobs this process does not know."""
    from hooocus_mcp.backend import LocalBackend
    from hooocus_mcp.stdio import serve_stdio

    server = build_server(LocalBackend(runtime, history=history), ServerOptions(default_caller=STDIO_CALLER))
    anyio.run(partial(serve_stdio, server, max_line_bytes=runtime.settings.mcp_stdio_max_line_bytes))


async def serve_stdio_remote(backend: Any, max_line_bytes: int = 4 * 1024 * 1024) -> None:
    from hooocus_mcp.stdio import serve_stdio

    server = build_server(backend, ServerOptions(default_caller=STDIO_CALLER))
    try:
        await serve_stdio(server, max_line_bytes=max_line_bytes)
    finally:
        await backend.aclose()
