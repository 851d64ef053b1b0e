"""``hooocus serve``: one process that owns the engine and serves /v1/ws, the HTTP API, the page and /mcp.

The product CLI (``hooocus.cli``) adds the sub-command (:func:`add_parser`), builds the settings and
the logging, and calls :func:`run` with the ``/mcp`` mount factory: this package never imports the
MCP door (nor the product CLI).

Tokens come from ``--tokens-file`` (or ``tokens_file`` in settings) or ``HOOOCUS_TOKENS``, one per line
``NAME TOKEN SCOPES``. With none configured the server refuses to start on a non-loopback host; on
loopback it generates one token and prints it once.

Jobs, their outcome and image files are recorded in ``<data_dir>/history.sqlite3`` (images written
to the output folder in dated folders), so ``GET /v1/jobs`` lists them after a restart. SIGTERM
shuts down gracefully (:class:`HooocusServer`) and the process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import urlsplit

import uvicorn

from engine.core.access import TokenStore
from engine.core.errors import UsageError
from engine.core.history import JobHistory
from engine.core.logging_setup import install_uvicorn_redaction
from engine.core.runtime import Runtime
from engine.core.settings import Settings
from hooocus_ws.app import McpMount, create_app, drain
from hooocus_ws.auth import parse_networks
from hooocus_ws.connlimits import ConnectionTracker, protocol_classes
from hooocus_ws.protocol import upload_frame_cap

log = logging.getLogger("hooocus.serve")

LOOPBACK_HOST_NAMES = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to the ``hooocus`` parser (handler in ``func``: :func:`run`).
    A flag whose destination is a Settings field name sets that field
    (:func:`engine.core.settings.settings_from_args`)."""
    p = subparsers.add_parser("serve", help="serve the websocket + HTTP API (and /mcp) over one engine")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8188; 0 = any free port)")
    p.add_argument("--model", help="base model: a name, path, repo id or 'demo' (default: settings)")
    p.add_argument("--tokens-file", type=Path, help="file of 'NAME TOKEN SCOPES' lines")
    p.add_argument("--allowed-origin", action="append", dest="allowed_origins", metavar="ORIGIN",
                   help="browser origin allowed to connect besides the server's own; repeat for several")
    p.add_argument("--allowed-host", action="append", dest="allowed_hosts", metavar="HOST",
                   help="Host header value to accept ('*' = any); default: loopback names on loopback")
    p.add_argument("--queue-size", type=int, help="jobs waiting at most (default 16)")
    p.add_argument("--public-url", help="absolute base for image URLs, e.g. https://gpu.example.org")
    p.add_argument("--config", type=Path, help="hooocus.toml to read (default: ./hooocus.toml)")
    p.add_argument("--data-dir", type=Path, help="data folder (models, outputs, history.sqlite3)")
    p.add_argument("--output-dir", type=Path, help="where finished images are written (default: DATA_DIR/outputs)")
    p.add_argument("--output-max-bytes", type=int, metavar="BYTES",
                   help="delete the oldest written images above this total size")
    p.add_argument("--output-max-age-days", type=float, metavar="DAYS", help="delete written images older than this")
    p.add_argument("--shutdown-grace-s", type=float, metavar="S",
                   help="on SIGTERM, how long the running job may take to finish (default 30)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--low-vram", dest="low_vram", action="store_const", const=True,
                   help="keep weights in CPU memory and stream them to the GPU as used (SDXL and FLUX.1 on small cards)")
    p.add_argument("--devices", type=_device_list, metavar="LIST",
                   help="one worker per device, e.g. cuda:0,cuda:1; auto = every visible GPU (default); "
                        "cpu may repeat (cpu,cpu)")
    p.add_argument("--model-memory-gb", type=float, metavar="GB",
                   help="memory each device may keep loaded models in, least recently used out first (default: GPU total minus max(4 GiB, 25%%); CPU: half the RAM)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="run up to N queued jobs the model can batch together (default 1 = off)")
    p.add_argument("--batch-window-ms", type=float, metavar="MS",
                   help="how long a worker waits for batch partners (default 0)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--backend", choices=["local", "ray"],
                   help="where jobs run: this process's GPU (local, default) or Ray Serve replicas (ray)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="with --backend ray: the Ray cluster (auto, ray://host:10001; default $RAY_ADDRESS or a local Ray)")
    p.add_argument("--ray-min-replicas", type=int, metavar="N", help="with --backend ray: fewest GPU replicas (default 1)")
    p.add_argument("--ray-max-replicas", type=int, metavar="N", help="with --backend ray: most GPU replicas (default 1)")
    p.add_argument("--ray-max-ongoing-requests", type=int, metavar="N",
                   help="with --backend ray: jobs in flight per replica, 1 or the batch size (default 1)")
    p.add_argument("--ray-num-gpus-per-replica", type=float, metavar="N",
                   help="with --backend ray: GPUs each replica reserves (default 1; 0 runs replicas on CPU)")
    p.add_argument("--no-ray-deploy", action="store_false", dest="ray_deploy", default=None,
                   help="with --backend ray: attach to an application deployed by a Serve config / RayService")
    p.set_defaults(func=run)
    return p


def _device_list(text: str) -> list[str]:
    # Names are checked by Settings (the boundary), which reports the bad entry's index.
    return [part.strip() for part in text.split(",")]


class McpMountFactory(Protocol):
    """Builds the ``/mcp`` endpoint over this server's runtime and tokens. The product CLI passes
    ``hooocus_mcp.http.create_mcp_mount``: this package never imports the MCP door itself."""

    def __call__(self, runtime: Runtime, tokens: TokenStore, *, allowed_hosts: Sequence[str],
                 allowed_origins: Sequence[str]) -> McpMount: ...


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOST_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_tokens(settings: Settings, *, out: TextIO) -> TokenStore:
    """The configured tokens; or, on loopback only, one generated token printed once to ``out``."""
    if settings.tokens_file is not None:
        store = TokenStore.from_file(settings.tokens_file)
    elif settings.tokens:
        store = TokenStore.parse(settings.tokens, source="HOOOCUS_TOKENS")
    else:
        store = TokenStore()
    if len(store):
        return store
    if not is_loopback(settings.host):
        raise UsageError(f"hooocus serve: refusing to serve on {settings.host} without tokens: give --tokens-file "
                         "or HOOOCUS_TOKENS ('NAME TOKEN SCOPES' lines)", code="unauthorized")
    store, token = TokenStore.generated("local")
    print("hooocus: no tokens configured; this run's token (all scopes, loopback only):", file=out)
    print(f"  {token}", file=out, flush=True)
    return store


def default_allowed_hosts(settings: Settings) -> tuple[str, ...]:
    """The Host names HTTP, the websocket and /mcp answer to (DNS-rebinding defence).

    ``allowed_hosts`` when configured (``"*"`` switches the check off, except on /mcp). Otherwise
    the loopback names, plus, on a non-loopback bind, the bound address itself (unless it is the
    wildcard 0.0.0.0 / ::) and the host of ``public_url``: a foreign Host is never accepted by
    default, even when bound to every interface."""
    if settings.allowed_hosts:
        return settings.allowed_hosts
    names = ["127.0.0.1", "localhost", "::1", "[::1]"]
    if not is_loopback(settings.host):
        bound = settings.host.strip("[]")
        if bound not in ("0.0.0.0", "::", ""):
            names.append(f"[{bound}]" if ":" in bound else bound)
        if settings.public_url:
            public_host = urlsplit(settings.public_url).hostname
            if public_host:
                names.append(f"[{public_host}]" if ":" in public_host else public_host)
        log.warning("serving on %s: only these Host names are answered: %s; list the names clients use with "
                    "--allowed-host (allowed_hosts)", settings.host, ", ".join(names))
    return tuple(dict.fromkeys(names))


def uvicorn_config(app: Any, *, host: str, port: int, max_message_bytes: int, log_level: str = "info",
                   ping_interval_s: float = 20.0, ping_timeout_s: float = 20.0,
                   graceful_shutdown_s: float | None = 30.0, header_timeout_s: float = 10.0,
                   max_connections_per_address: int = 64, trusted_proxies: Sequence[str] = (),
                   max_upload_bytes: int = 0) -> uvicorn.Config:
    """The one uvicorn setup (also used by the tests and the conformance run): sans-io websockets,
    ``ws_max_size`` as the hard frame cap (close 1009), no per-message-deflate, protocol pings, and
    our header-read timeout and per-address connection cap (:mod:`hooocus_ws.connlimits`).
    With ``max_upload_bytes`` the frame cap also admits a binary upload frame of that size; text
    frames stay capped at ``max_message_bytes`` by the session itself."""
    tracker = ConnectionTracker(max_connections_per_address, exempt=parse_networks(trusted_proxies))
    http_class, ws_class = protocol_classes(tracker, header_timeout_s=header_timeout_s)
    config = uvicorn.Config(app, host=host, port=port, http=http_class, ws=ws_class,
                            ws_max_size=max(max_message_bytes, upload_frame_cap(max_upload_bytes)),
                            ws_per_message_deflate=False, ws_ping_interval=ping_interval_s,
                            ws_ping_timeout=ping_timeout_s, lifespan="on", log_level=log_level,
                            timeout_graceful_shutdown=graceful_shutdown_s, server_header=False,
                            proxy_headers=False, log_config=None)  # our root handler (masking) gets uvicorn's records
    install_log_redaction()
    return config


class HooocusServer(uvicorn.Server):
    """uvicorn with our graceful shutdown: ``before_shutdown`` (:func:`hooocus_ws.app.drain`) runs
    first, while the listener is still open, so a load balancer's ``/healthz`` gets 503 during the
    drain and new work is refused with ``shutting_down`` (not a connection error); then uvicorn
    closes the listener and the connections (websockets: 1012). A SIGTERM that was handled this way
    ends the process with exit code 0. A SIGTERM during the model warm-up waits for the load to
    finish (it cannot be interrupted), then drains."""

    def __init__(self, config: uvicorn.Config, *,
                 before_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(config)
        self._before_shutdown = before_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._before_shutdown is not None and not self.force_exit:
            try:
                await self._before_shutdown()
            except Exception:  # the rest of the shutdown must still happen
                log.exception("graceful drain failed")
        await super().shutdown(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the captured signal after its shutdown, which would kill the process
            # with SIGTERM's default action; our shutdown is complete, so SIGTERM means exit 0.
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


class ClientFaultTracebackFilter(logging.Filter):
    """uvicorn logs a full traceback when a client sends a text frame that is not UTF-8 (it closes
    the connection with 1007 correctly). That is the client's fault, not ours: keep one line."""

    CLIENT_FAULT_MESSAGES = frozenset({"Invalid UTF-8 sequence received from client."})

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.msg in self.CLIENT_FAULT_MESSAGES:
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def install_log_redaction() -> None:
    """uvicorn logs request paths with their query strings; mask anything that looks like a credential.
    Client faults that uvicorn logs with a traceback are cut to one line."""
    install_uvicorn_redaction()
    error_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ClientFaultTracebackFilter) for f in error_logger.filters):
        error_logger.addFilter(ClientFaultTracebackFilter())


@dataclass
class Prepared:
    config: uvicorn.Config
    runtime: Runtime
    settings: Settings
    history: JobHistory | None = None

    def server(self) -> HooocusServer:
        """The uvicorn server with our graceful shutdown."""
        ctx = self.config.app.state.hooocus
        return HooocusServer(self.config, before_shutdown=lambda: drain(ctx))


def prepare_server(args: argparse.Namespace, settings: Settings, *, out: TextIO = sys.stdout,
                   runtime: Runtime | None = None, with_history: bool = True,
                   mcp_mount_factory: McpMountFactory | None = None) -> Prepared:
    """Everything ``serve`` does before running uvicorn (tests call this without serving).
    ``with_history`` opens ``<data_dir>/history.sqlite3``; serving closes it on shutdown.
    ``mcp_mount_factory`` None serves no ``/mcp``."""
    tokens = resolve_tokens(settings, out=out)
    if runtime is None:
        from engine.core.runtime import create_runtime

        # The runtime opens the history (marking jobs a crashed previous run left unfinished as
        # interrupted, and logging that) and records jobs and images as every command does.
        runtime = create_runtime(settings, model=args.model, record_history=with_history)
    history = runtime.history
    if history is None and with_history:  # a runtime built by the caller (tests) without one
        history = JobHistory.from_settings(settings)
    allowed_hosts = default_allowed_hosts(settings)
    mcp_mount = None
    if mcp_mount_factory is not None:
        mcp_mount = mcp_mount_factory(runtime, tokens, allowed_hosts=allowed_hosts,
                                      allowed_origins=settings.allowed_origins)
    app = create_app(runtime, tokens=tokens, allowed_origins=settings.allowed_origins, allowed_hosts=allowed_hosts,
                     mcp_mount=mcp_mount, history=history, shutdown_grace_s=settings.shutdown_grace_s,
                     public_url=settings.public_url)
    config = uvicorn_config(app, host=settings.host, port=settings.port,
                            max_message_bytes=settings.max_message_bytes, log_level=settings.log_level,
                            graceful_shutdown_s=settings.shutdown_grace_s + 5.0,
                            header_timeout_s=settings.header_timeout_s,
                            max_connections_per_address=settings.max_connections_per_address,
                            trusted_proxies=settings.trusted_proxies, max_upload_bytes=settings.max_upload_bytes)
    return Prepared(config=config, runtime=runtime, settings=settings, history=history)


def serve(prepared: Prepared) -> int:
    """Run the prepared server until SIGINT/SIGTERM; 0 after a graceful shutdown."""
    prepared.server().run()
    return 0


def run(args: argparse.Namespace, settings: Settings, *, runtime: Runtime | None = None,
        mcp_mount_factory: McpMountFactory | None = None) -> int:
    """``hooocus serve``. The caller has configured logging (engine.core.logging_setup) first, so
    the set-up (history recovery, MCP) is logged through the masking handler."""
    return serve(prepare_server(args, settings, runtime=runtime, mcp_mount_factory=mcp_mount_factory))
