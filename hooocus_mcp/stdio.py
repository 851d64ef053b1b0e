"""The stdio wire of ``hooocus mcp``, guarded: bounded lines and JSON-RPC errors for malformed input.

The SDK's ``stdio_server()`` reads unbounded lines and drops anything that does not validate without a
word (issue 11 #10). We keep its transport (stdout writer, fd handling) and hand it a filtered stdin
instead: each line is read with a byte cap and checked first; what JSON-RPC 2.0 says deserves an
answer gets one through the SDK's own write stream (so frames never interleave), the rest is logged
to stderr (one line each, the first few and then every 1000th, so a flood cannot fill the log).

Answers (JSON-RPC 2.0 §5.1; MCP 2025-06-18 removed batches):
  not JSON / not UTF-8 -> -32700 parse error, id null
  an array (batch), a non-object, ``jsonrpc`` not "2.0", an id that is not a string or integer,
  a non-string method, no method and no result/error, a line over the cap -> -32600 invalid request
  (the message's id when it has a valid one, else null)
  a notification with a method the MCP spec does not define -> dropped, logged
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

import anyio

from hooocus_mcp._sdk import (
    ErrorData,
    JSONRPCError,
    MCPServer,
    SessionMessage,
    claim_stdin,
    jsonrpc_message_adapter,
    run_server_on_streams,
    stdio_server,
)

log = logging.getLogger("hooocus.mcp.stdio")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
#: Client-to-server notifications of the MCP spec; anything else is dropped with a log line.
KNOWN_NOTIFICATIONS = frozenset({"notifications/initialized", "notifications/cancelled", "notifications/progress",
                                 "notifications/roots/list_changed", "notifications/elicitation/complete"})
_SKIP_CHUNK_BYTES = 64 * 1024
_LOG_FIRST_N = 20


def _valid_id(value: Any) -> bool:
    # MCP: "string or integer" (never null); bool is an int subclass in Python but not in JSON.
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def check_message(text: str) -> tuple[int, str, Any] | str | None:
    """None when ``text`` is a JSON-RPC message the SDK may have; ``(code, message, id)`` when it
    needs an error response; a string (why) when it is to be dropped with a log line only."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        return PARSE_ERROR, f"Parse error: {exc.msg} at character {exc.pos}", None
    if isinstance(data, list):
        return INVALID_REQUEST, "Invalid Request: batches (JSON arrays) are not supported by MCP", None
    if not isinstance(data, dict):
        return INVALID_REQUEST, "Invalid Request: a message is a JSON object", None
    has_id = "id" in data
    msg_id = data.get("id") if has_id and _valid_id(data.get("id")) else None
    if data.get("jsonrpc") != "2.0":
        return INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"', msg_id
    if has_id and not _valid_id(data["id"]):
        return INVALID_REQUEST, 'Invalid Request: "id" must be a string or an integer', None
    if "method" in data:
        if not isinstance(data["method"], str):
            return INVALID_REQUEST, 'Invalid Request: "method" must be a string', msg_id
        if not has_id and data["method"] not in KNOWN_NOTIFICATIONS:
            return f"unknown notification {data['method'][:80]!r}"
    elif not has_id or ("result" in data) == ("error" in data):
        return INVALID_REQUEST, 'Invalid Request: no "method" (and not a response with "result" or "error")', msg_id
    try:
        jsonrpc_message_adapter.validate_python(data, by_name=False)
    except ValueError:
        if not has_id:
            return "malformed notification"
        return INVALID_REQUEST, "Invalid Request: the message does not match the JSON-RPC schema", msg_id
    return None


class GuardedStdin:
    """An async iterable of checked lines over a binary stdin, for ``stdio_server(stdin=...)``."""

    def __init__(self, raw: BinaryIO, *, max_line_bytes: int) -> None:
        self._raw = raw
        self.max_line_bytes = max_line_bytes
        self._write_stream: Any = None
        self._ready = anyio.Event()
        self.rejected = 0

    def attach(self, write_stream: Any) -> None:
        """The SDK's write stream, for error responses (set once ``stdio_server`` has started)."""
        self._write_stream = write_stream
        self._ready.set()

    def _read_line(self) -> bytes | None:
        """One line (with its newline) or b"" at EOF; None for a line over the cap (skipped)."""
        line = self._raw.readline(self.max_line_bytes + 1)
        if len(line) <= self.max_line_bytes or line.endswith(b"\n"):
            return line
        while line and not line.endswith(b"\n"):  # skip the rest without keeping it
            line = self._raw.readline(_SKIP_CHUNK_BYTES)
        return None

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            # A worker thread, as anyio.wrap_file in the SDK; abandoned on cancel so a blocked
            # read of stdin never holds up the process exit.
            line = await anyio.to_thread.run_sync(self._read_line, abandon_on_cancel=True)
            if line == b"":
                return
            if line is None:
                await self._reject(INVALID_REQUEST, f"Invalid Request: line longer than {self.max_line_bytes} bytes",
                                   None, "oversized line")
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                await self._reject(PARSE_ERROR, "Parse error: not UTF-8", None, "not UTF-8")
                continue
            if not text.strip():
                continue
            verdict = check_message(text)
            if verdict is None:
                yield text
            elif isinstance(verdict, str):
                self._log("ignored", verdict)
            else:
                code, message, msg_id = verdict
                await self._reject(code, message, msg_id, message)

    async def _reject(self, code: int, message: str, msg_id: Any, why: str) -> None:
        self._log(f"answered {code}", why)
        await self._ready.wait()
        error = JSONRPCError(jsonrpc="2.0", id=msg_id, error=ErrorData(code=code, message=message))
        try:
            await self._write_stream.send(SessionMessage(error))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # the server is ending; nobody is left to tell

    def _log(self, action: str, why: str) -> None:
        self.rejected += 1
        if self.rejected <= _LOG_FIRST_N or self.rejected % 1000 == 0:
            log.warning("stdin: bad MCP message %s (%s); %d so far", action, why, self.rejected)


async def serve_stdio(server: MCPServer, *, max_line_bytes: int, stdin: BinaryIO | None = None) -> None:
    """Serve ``server`` on stdin/stdout until stdin closes (``server.run_stdio_async``, guarded)."""
    restore = None
    if stdin is None:
        stdin, restore = claim_stdin()
    guard = GuardedStdin(stdin, max_line_bytes=max_line_bytes)
    try:
        async with stdio_server(stdin=guard) as (read_stream, write_stream):  # type: ignore[arg-type]
            guard.attach(write_stream)
            await run_server_on_streams(server, read_stream, write_stream)
    finally:
        if restore is not None:
            restore()
