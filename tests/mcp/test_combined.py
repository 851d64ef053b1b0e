"""One process, one engine: a websocket job and an MCP (streamable HTTP) job queued together in the
``hooocus serve`` app both finish, one after the other, never interleaving steps (matrix row 34)."""

from __future__ import annotations

import importlib.util

import anyio
import pytest

from engine.core.access import TokenStore
from engine.core.testing import FakeRunner, StepGate
from hooocus_mcp.http import create_mcp_mount
from tests.mcp.conftest import ALICE_TOKEN, BOB_TOKEN, TOKENS_TEXT, live_server, make_runtime
from tests.mcp.test_http import mcp_client

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(importlib.util.find_spec("hooocus_ws.app") is None
                       or importlib.util.find_spec("hooocus_ws.client") is None,
                       reason="hooocus_ws.app.create_app / hooocus_ws.client are not written yet"),
]


@pytest.mark.parametrize("path", ["/mcp", "/mcp/"])
async def test_websocket_and_mcp_jobs_share_one_queue_without_interleaving(path: str) -> None:
    from hooocus_ws.app import create_app
    from hooocus_ws.client import HooocusClient

    gate = StepGate(2)
    runner = FakeRunner(on_step=gate)
    runtime = make_runtime(runner).start()
    tokens = TokenStore.parse(TOKENS_TEXT)
    mount = create_mcp_mount(runtime, tokens)
    app = create_app(runtime, tokens=tokens, mcp_mount=mount, manage_runtime=False)
    try:
        with live_server(app) as live:
            ws = await HooocusClient.connect(live.url.replace("http", "ws") + "/v1/ws", BOB_TOKEN, timeout_s=10)
            try:
                ws_stream = await ws.generate({"prompt": "websocket job", "performance": "Lightning"})
                assert await anyio.to_thread.run_sync(gate.reached.wait, 10)  # the ws job holds the GPU
                async with mcp_client(live, ALICE_TOKEN, path=path) as mcp:
                    outcome = {}

                    async def call() -> None:
                        outcome["mcp"] = await mcp.call_tool("generate_image", {"prompt": "mcp job",
                                                                                "performance": "Lightning"})

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(call)
                        with anyio.fail_after(10):
                            while len(runtime.engine.jobs()) < 2:
                                await anyio.sleep(0.01)
                        mcp_job = runtime.engine.jobs()[1]
                        assert runtime.engine.queue_position(mcp_job.job_id) == 1  # queued behind the ws job
                        gate.release()
                ws_result = await ws_stream.result(timeout_s=10)
            finally:
                await ws.close()
    finally:
        runtime.close()
    assert ws_result.state == "done" and outcome["mcp"].structured_content["status"] == "completed"
    ws_job, mcp_job = runtime.engine.jobs()
    assert (ws_job.owner, mcp_job.owner) == ("bob", "alice")
    assert runner.step_log == [(ws_job.job_id, s) for s in range(1, 5)] + [(mcp_job.job_id, s) for s in range(1, 5)]
    assert runner.max_concurrent_seen == 1
