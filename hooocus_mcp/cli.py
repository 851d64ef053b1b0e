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
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from hooocus_mcp.tools import ServerOptions, build_server
from hooocus_ws.tokens import Principal

#: stdio has no authentication: the trust boundary is the host process that launched us.
STDIO_CALLER = Principal("stdio", frozenset({"generate", "cancel:own"}))


def register(subparsers: Any) -> None:
    """Add the ``mcp`` sub-command to the ``hooocus`` parser."""
    p = subparsers.add_parser("mcp", help="serve MCP on stdio (embedded engine, or --connect to 'hooocus serve')")
    p.add_argument("--model", help="model name, path, HF repo id, or 'demo' (embedded mode)")
    p.add_argument("--connect", metavar="URL", help="ws://host:port/v1/ws of a running 'hooocus serve' to forward to")
    p.add_argument("--token-env", default="HOOOCUS_TOKEN", metavar="NAME",
                   help="environment variable holding the token for --connect (default HOOOCUS_TOKEN)")
    p.add_argument("--config", type=Path, help="hooocus.toml to read (default: ./hooocus.toml)")
    p.add_argument("--data-dir", type=Path, help="data folder (models, outputs, history)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def _log_to_stderr(level: str) -> None:
    # stdout is the MCP channel: every record goes to stderr, with context and secrets masked.
    from engine.core.logging_setup import configure_logging

    configure_logging(level, stream=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from hooocus.cli import CliError, settings_from_args

    settings, _ = settings_from_args(args)
    _log_to_stderr(args.log_level or settings.log_level)
    if args.connect:
        if args.model:
            raise CliError("hooocus mcp: --model and --connect exclude each other (the server owns the model)")
        token = os.environ.get(args.token_env, "")
        if not token:
            raise CliError(f"hooocus mcp: --connect needs a token in ${args.token_env}")
        from hooocus_mcp.remote import RemoteBackend

        anyio.run(serve_stdio_remote, RemoteBackend.for_url(args.connect, token), settings.mcp_stdio_max_line_bytes)
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


def main(argv: list[str] | None = None) -> int:
    """``python -m hooocus_mcp ARGS`` = ``hooocus mcp ARGS``, without the other sub-commands."""
    from engine.core.errors import HooocusError
    from hooocus.cli import CliError

    parser = argparse.ArgumentParser(prog="hooocus")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["mcp", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except HooocusError as exc:
        print(f"hooocus mcp: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
