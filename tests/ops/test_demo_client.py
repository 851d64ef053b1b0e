"""The Python client and ``hooocus generate --server`` against a live server on the demo model (the
real SDXL runner, tiny, CPU): a connection dropped mid-job and re-attached with
``subscribe(job_id, after_seq)`` loses and doubles nothing; the CLI writes the image it got."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from engine.core.errors import HooocusError
from engine.core.events import Preview, Queued
from engine.core.history import JobHistory
from engine.core.jobs import Engine, RunContext
from engine.core.runtime import Runtime
from engine.core.settings import Settings
from engine.core.store import ImageStore
from hooocus_ws.client import HooocusClient
from tests.ws.conftest import ALICE, LiveServer, make_app, start_server

PARAMS = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 6, "seed": 11,
          "performance": "Speed", "styles": []}


class GatedRunner:
    """The demo SDXL runner, held after sampling step ``hold_step`` of the first image until
    ``release`` is set (outside the job's lock, so clients can subscribe meanwhile)."""

    def __init__(self, inner: Any, hold_step: int) -> None:
        self.inner = inner
        self.hold_step = hold_step
        self.reached = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:  # check, options, warmup, recover_after_oom
        return getattr(self.inner, name)

    def run(self, ctx: RunContext) -> None:
        progress = ctx.progress

        def gated(step: int, total_steps: int, **kwargs: Any) -> None:
            progress(step, total_steps, **kwargs)
            if kwargs.get("stage") == "sample" and kwargs.get("image_index") == 0 and step == self.hold_step:
                self.reached.set()
                assert self.release.wait(30), "the test never released the runner"

        ctx.progress = gated  # type: ignore[method-assign]
        self.inner.run(ctx)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, GatedRunner]]:
    from engine.sdxl.pipeline import SDXLRunner

    settings = Settings(data_dir=tmp_path_factory.mktemp("demo-data"), shutdown_grace_s=1.0)
    runner = GatedRunner(SDXLRunner(settings, model="demo"), hold_step=3)
    runner.release.set()  # open unless a test closes it
    images = ImageStore()
    runtime = Runtime(settings=settings, engine=Engine(runner, image_sink=images.put), images=images)
    history = JobHistory.from_settings(settings)
    live = start_server(make_app(runtime, history=history), runtime)
    yield live, runner
    live.stop()


def test_dropped_connection_mid_job_reattach_loses_and_doubles_nothing(demo_server, tmp_path):
    live, runner = demo_server
    runner.reached.clear()
    runner.release.clear()

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any, str]:
        first_events: list[dict[str, Any]] = []
        first = await HooocusClient.connect(live.ws_url, ALICE, timeout_s=20)
        stream = await first.generate({**PARAMS, "image_number": 2}, on_event=first_events.append)
        assert await asyncio.to_thread(runner.reached.wait, 60)  # sampling image 0, held at step 3
        first._ws.transport.abort()  # the network goes away mid-job, without a close frame
        with pytest.raises(HooocusError):
            await stream.result(timeout_s=10)
        after_seq = stream.last_job_seq
        async with await HooocusClient.connect(live.ws_url, ALICE, timeout_s=20) as second:
            resumed = await second.subscribe(stream.job_id, after_seq)
            runner.release.set()  # the rest arrives live
            second_events = [event async for event in resumed]
            return first_events, second_events, await resumed.result(timeout_s=30), stream.job_id

    try:
        first_events, second_events, result, job_id = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        runner.release.set()
    job = live.runtime.engine.get_job(job_id)
    expected = [e.seq for e in job.events_after(0) if not isinstance(e, Preview | Queued)]
    seen = [e["job_seq"] for e in first_events + second_events if e["type"] not in ("accepted", "queue")]
    assert seen == expected  # every event once, in order, across both connections
    assert first_events[-1]["type"] == "progress" and second_events  # both connections carried part of it
    assert second_events[-1]["type"] == "done" and result.state == "done"
    assert [image.sha256 for image in result.images] == [image.sha256 for image in job.images]
    paths = result.save(tmp_path / "saved")
    assert [p.read_bytes() for p in paths] == [image.data for image in job.images]
    assert all(p.parent.parent == tmp_path / "saved" and p.suffix == ".png" for p in paths)


def test_hooocus_generate_server_writes_the_image(demo_server, tmp_path, capsys):
    from hooocus.cli import main

    live, _ = demo_server
    out = tmp_path / "out"
    code = main(["generate", "a red fox in snow", "--server", live.ws_url, "--token", ALICE, "--out", str(out),
                 "--width", "64", "--height", "64", "--steps", "3", "--seed", "5", "--performance", "Speed",
                 "--json"])
    assert code == 0, capsys.readouterr().err
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    path = Path(line["path"])
    assert path.is_file() and path.parent.parent == out and line["seed"] == "5"
    assert Image.open(io.BytesIO(path.read_bytes())).size == (64, 64)
    jobs = httpx.get(f"{live.http_url}/v1/jobs", params={"limit": 1},
                     headers={"Authorization": f"Bearer {ALICE}"}, timeout=10).json()["jobs"]
    assert jobs[0]["state"] == "done" and jobs[0]["images"][0]["sha256"] == line["sha256"]


def test_hooocus_generate_server_reports_a_refused_request(demo_server, tmp_path, capsys):
    from hooocus.cli import main

    live, _ = demo_server
    code = main(["generate", "x", "--server", live.ws_url, "--token", ALICE, "--out", str(tmp_path),
                 "--style", "No Such Style"])
    assert code == 2 and "unknown_style" in capsys.readouterr().err  # the server's refusal, its code kept
    code = main(["generate", "x", "--server", live.ws_url, "--token", "wrong-token-0123456789abc"])
    assert code != 0 and "unauthorized" in capsys.readouterr().err
