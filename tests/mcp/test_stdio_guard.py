"""``hooocus mcp`` over stdio with malformed input (issue 11 #10): JSON-RPC errors where the spec asks for
them, a log line for the rest, and a cap on the line length; and embedded mode keeps jobs and images in
the data folder so the next process (one per MCP Inspector call) can read them."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys

import anyio
import pytest

from hooocus_mcp._sdk import Client, StdioServerParameters
from hooocus_mcp.stdio import INVALID_REQUEST, PARSE_ERROR, GuardedStdin, check_message
from tests.mcp.test_stdio import ENV
from tests.paths import REPO_ROOT

INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


@pytest.mark.parametrize("line, code, msg_id", [
    ("not json", PARSE_ERROR, None),
    ('{"jsonrpc":"2.0","id":1,"method":"ping"', PARSE_ERROR, None),
    ("{}", INVALID_REQUEST, None),
    ("7", INVALID_REQUEST, None),
    ('{"jsonrpc":"1.0","id":1,"method":"ping"}', INVALID_REQUEST, 1),
    ('{"id":"a","method":"ping"}', INVALID_REQUEST, "a"),
    ('{"jsonrpc":"2.0","id":2}', INVALID_REQUEST, 2),
    ('{"jsonrpc":"2.0","id":3,"result":{},"error":{"code":1,"message":"x"}}', INVALID_REQUEST, 3),
    ('{"jsonrpc":"2.0","id":[1],"method":"ping"}', INVALID_REQUEST, None),
    ('{"jsonrpc":"2.0","id":true,"method":"ping"}', INVALID_REQUEST, None),
    ('{"jsonrpc":"2.0","id":1.5,"method":"ping"}', INVALID_REQUEST, None),
    ('{"jsonrpc":"2.0","id":null,"method":"ping"}', INVALID_REQUEST, None),
    ('{"jsonrpc":"2.0","id":4,"method":7}', INVALID_REQUEST, 4),
    ('{"jsonrpc":"2.0","id":5,"method":"tools/call","params":5}', INVALID_REQUEST, 5),
    ('[{"jsonrpc":"2.0","id":6,"method":"ping"}]', INVALID_REQUEST, None),
    ("[]", INVALID_REQUEST, None),
])
def test_malformed_messages_get_the_json_rpc_error(line: str, code: int, msg_id: object) -> None:
    verdict = check_message(line)
    assert isinstance(verdict, tuple) and verdict[0] == code and verdict[2] == msg_id


@pytest.mark.parametrize("line", ['{"jsonrpc":"2.0","method":"notifications/bogus"}',
                                  '{"jsonrpc":"2.0","method":"notifications/progress","params":7}'])
def test_bad_notifications_are_dropped_without_an_answer(line: str) -> None:
    assert isinstance(check_message(line), str)


@pytest.mark.parametrize("line", [json.dumps(INIT), '{"jsonrpc":"2.0","method":"notifications/initialized"}',
                                  '{"jsonrpc":"2.0","id":"x","result":{}}', '{"jsonrpc":"2.0","id":9,"method":"nosuch"}'])
def test_valid_messages_pass_to_the_sdk(line: str) -> None:
    assert check_message(line) is None  # an unknown *request* method is the SDK's -32601


def test_an_oversized_line_is_skipped_without_being_kept() -> None:
    guard = GuardedStdin(io.BytesIO(b"x" * 100_000 + b"\n" + b'{"a":1}\n'), max_line_bytes=1024)
    assert guard._read_line() is None
    assert guard._read_line() == b'{"a":1}\n'
    assert guard._read_line() == b""


async def _converse(lines: list[bytes], *, until_id: int, env: dict[str, str]) -> tuple[list[dict], str]:
    args = [sys.executable, "-m", "tests.mcp.stdio_fake_server"]
    answers: list[dict] = []
    async with await anyio.open_process(args, cwd=str(REPO_ROOT), env=env) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        for line in lines:
            await proc.stdin.send(line + b"\n")
        buffer = b""
        with anyio.fail_after(20):
            while not any(a.get("id") == until_id for a in answers):
                buffer += await proc.stdout.receive()
                *complete, buffer = buffer.split(b"\n")
                answers += [json.loads(c) for c in complete if c]
        await proc.stdin.aclose()
        with anyio.fail_after(20):
            await proc.wait()
        err = b""
        with anyio.move_on_after(5):
            async for chunk in proc.stderr:
                err += chunk
    return answers, err.decode()


@pytest.mark.anyio
async def test_stdio_server_answers_malformed_lines_and_keeps_serving() -> None:
    bad = [b"not json", b"{}", b'{"jsonrpc":"1.0","id":1,"method":"ping"}', b'{"jsonrpc":"2.0","id":2}',
           b'[{"jsonrpc":"2.0","id":4,"method":"ping"}]', b'{"jsonrpc":"2.0","method":"notifications/bogus"}',
           b'{"jsonrpc":"2.0","id":3,"method":"ping","pad":"' + b"y" * 5000 + b'"}', b"\xff\xfe"]
    lines = [json.dumps(INIT).encode(), b'{"jsonrpc":"2.0","method":"notifications/initialized"}', *bad,
             b'{"jsonrpc":"2.0","id":7,"method":"ping"}']
    answers, err = await _converse(lines, until_id=7, env={**ENV, "HOOOCUS_MCP_STDIO_MAX_LINE_BYTES": "2000"})
    errors = [(a["id"], a["error"]["code"]) for a in answers if "error" in a]
    # Before: no answer to any of them (the SDK drops what does not validate) and unbounded lines.
    assert errors == [(None, PARSE_ERROR), (None, INVALID_REQUEST), (1, INVALID_REQUEST), (2, INVALID_REQUEST),
                      (None, INVALID_REQUEST), (None, INVALID_REQUEST), (None, PARSE_ERROR)]
    assert any("longer than 2000 bytes" in a["error"]["message"] for a in answers if "error" in a)
    assert {"jsonrpc": "2.0", "id": 7, "result": {}} in answers  # still serving
    assert "unknown notification 'notifications/bogus'" in err and "Traceback" not in err


def _server(data_dir, step_delay_s: float) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, cwd=str(REPO_ROOT), env=ENV,
                                 args=["-m", "tests.mcp.stdio_fake_server", str(step_delay_s), str(data_dir)])


@pytest.mark.anyio
async def test_a_job_that_outlives_its_process_is_readable_from_the_next_one(tmp_path) -> None:
    async with Client(_server(tmp_path, 0.05)) as first:
        started = await first.call_tool("generate_image", {"prompt": "slow fox", "performance": "Lightning",
                                                            "wait_timeout_s": 0})
    assert started.structured_content["status"] == "running"
    job_id = started.structured_content["job_id"]
    # The first process let the running job finish (shutdown_grace_s) and recorded it before exiting.
    async with Client(_server(tmp_path, 0.0)) as second:
        later = await second.call_tool("get_job", {"job_id": job_id})
        assert not later.is_error, later.content[0].text
        ref = later.structured_content["images"][0]
        blob = base64.b64decode((await second.read_resource(ref["uri"])).contents[0].blob)
        unknown = await second.call_tool("get_job", {"job_id": "nope"})
    assert later.structured_content["status"] == "completed"
    assert later.structured_content["params_resolved"]["prompt"] == "slow fox"
    assert hashlib.sha256(blob).hexdigest() == ref["sha256"]
    assert unknown.is_error and "not_found" in unknown.content[0].text
