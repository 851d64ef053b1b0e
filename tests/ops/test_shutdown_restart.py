"""Issue 7 on a real ``hooocus serve`` process: SIGTERM with one running and three queued jobs
(queued ones cancelled ``shutting_down``, the running one finishes within the grace period, sockets
close 1012, exit code 0), then a restart on the same data folder lists all four from the history,
serves the finished image from disk, and the log never shows a token or a prompt at INFO."""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
from typing import Any

import httpx
import pytest

from engine.core.errors import JobCancelled
from hooocus_ws.client import HooocusClient
from tests.ops.conftest import ADMIN, ALICE, BOB, ServerProcess

PROMPT = "zebra-marmalade-quasar"  # must never reach an INFO log


async def shutdown_scenario(server: ServerProcess) -> dict[str, Any]:
    alice = await HooocusClient.connect(server.ws_url, ALICE, timeout_s=10)
    bob = await HooocusClient.connect(server.ws_url, BOB, timeout_s=10)
    running = await alice.generate({"prompt": PROMPT, "steps": 25, "seed": 7})
    async for event in running:  # the job holds the worker before anything else is queued
        if event["type"] == "progress":
            break
    queued = [await alice.generate({"prompt": PROMPT, "steps": 25}) for _ in range(2)]
    queued.append(await bob.generate({"prompt": PROMPT, "steps": 25}))
    # Fair share (issue 15): bob, not served yet, goes ahead of alice's queued jobs (their positions
    # move up by one when the update reaches alice's client, which may not have happened yet).
    first, second, bobs = (stream.position for stream in queued)
    assert bobs == 1 and first < second
    server.proc.send_signal(signal.SIGTERM)  # while the first job runs
    result = await running.result(timeout_s=20)
    reasons = []
    for stream in queued:
        with pytest.raises(JobCancelled) as info:
            await stream.result(timeout_s=20)
        reasons.append(info.value.reason)
    codes = []
    for client in (alice, bob):
        await asyncio.wait_for(client._reader, 20)  # the server closes the socket
        codes.append(client._ws.close_code)
        await client.close()
    return {"result": result, "reasons": reasons, "codes": codes,
            "ids": [running.job_id, *(stream.job_id for stream in queued)]}


def test_sigterm_drains_then_restart_shows_the_history(tmp_path):
    server = ServerProcess(tmp_path, step_ms=40.0, grace_s=20.0)
    try:
        outcome = asyncio.run(asyncio.wait_for(shutdown_scenario(server), 60))
        exit_code = server.proc.wait(30)
    finally:
        server.kill()
    first_log = server.log
    assert exit_code == 0, first_log
    result = outcome["result"]
    assert result.state == "done" and len(result.images) == 1  # finished within the grace period
    assert outcome["reasons"] == ["shutting_down"] * 3
    assert outcome["codes"] == [1012, 1012]
    done_id, *cancelled_ids = outcome["ids"]
    image = result.images[0]
    assert hashlib.sha256(image.data).hexdigest() == image.sha256

    again = ServerProcess(tmp_path)
    try:
        with httpx.Client(base_url=again.http_url, timeout=10) as http:
            def get(path: str, token: str, **params: Any) -> httpx.Response:
                return http.get(path, params=params, headers={"Authorization": f"Bearer {token}"})

            mine = get("/v1/jobs", ALICE).json()
            assert [job["job_id"] for job in mine["jobs"]] == [cancelled_ids[1], cancelled_ids[0], done_id]
            assert mine["next_before"] is None
            assert [job["job_id"] for job in get("/v1/jobs", BOB).json()["jobs"]] == [cancelled_ids[2]]
            everyone = get("/v1/jobs", ADMIN).json()["jobs"]
            assert {job["job_id"] for job in everyone} == {done_id, *cancelled_ids}
            states = {job["job_id"]: (job["state"], (job["error"] or {}).get("reason")) for job in everyone}
            assert states == {done_id: ("done", None), **{i: ("cancelled", "shutting_down") for i in cancelled_ids}}
            page = get("/v1/jobs", ALICE, limit=2).json()
            assert len(page["jobs"]) == 2 and page["next_before"] == cancelled_ids[0]
            rest = get("/v1/jobs", ALICE, limit=2, before=page["next_before"]).json()
            assert [job["job_id"] for job in rest["jobs"]] == [done_id]

            job = get(f"/v1/jobs/{done_id}", ALICE).json()
            assert job["state"] == "done" and job["seeds"] == ["7"] and job["params"]["steps"] == 25
            assert job["request"]["prompt"] == PROMPT
            assert "path" not in job["images"][0] and "owner" not in job  # not for non-admins
            assert get(f"/v1/jobs/{done_id}", BOB).status_code == 404  # someone else's: not found
            admin_view = get(f"/v1/jobs/{done_id}", ADMIN).json()
            assert admin_view["owner"] == "alice"
            assert re.search(r"outputs/\d{4}-\d{2}-\d{2}/[^/]+_7_0\.png$", admin_view["images"][0]["path"])
            served = http.get(job["images"][0]["url"])  # a signed URL; the bytes come from disk now
            assert served.status_code == 200 and served.content == image.data
        assert again.terminate() == 0
    finally:
        again.kill()
    log = first_log + again.log
    for secret in (ALICE, BOB, ADMIN):
        assert secret not in log
    assert PROMPT not in log
    assert re.search(rf"\[job_id={done_id} principal=alice\].*job {done_id} done", log)
    assert re.search(rf"principal=bob\].*job {cancelled_ids[2]} cancelled \(shutting_down\)", log)
