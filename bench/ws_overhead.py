"""Websocket front-door overhead: latency to ``accepted`` and to the first ``progress``, and end-to-end
time over calling the engine directly in the same process, at 1 and 10 concurrent clients.

    .venv/bin/python bench/ws_overhead.py                 # demo model if engine.sdxl.pipeline exists, else fake
    .venv/bin/python bench/ws_overhead.py --runner fake --step-ms 20 --steps 30

Not a test: it prints numbers (and a JSON line for scripts). Goal: overhead <= 3 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from engine.core.access import TokenStore  # noqa: E402
from engine.core.events import Progress  # noqa: E402
from engine.core.jobs import Engine, Job  # noqa: E402
from engine.core.runtime import Runtime, create_runtime  # noqa: E402
from engine.core.settings import Settings  # noqa: E402
from engine.core.store import ImageStore  # noqa: E402
from engine.core.testing import FakeRunner  # noqa: E402
from hooocus_ws.app import create_app  # noqa: E402
from hooocus_ws.cli import uvicorn_config  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


def build_runtime(kind: str, step_ms: float, data_dir: Path) -> tuple[Runtime, str]:
    settings = Settings(data_dir=data_dir, queue_size=64, max_queued_per_principal=64, shutdown_grace_s=1.0)
    if kind == "demo":
        # No history: the benchmark measures the websocket path, not SQLite and PNG writes.
        return create_runtime(settings, model="demo", record_history=False), "demo model (engine.sdxl.pipeline)"
    images = ImageStore()
    runner = FakeRunner(step_delay_s=step_ms / 1000.0, image_max_side_px=1024)
    engine = Engine(runner, max_queue=64, image_sink=images.put)
    return Runtime(settings=settings, engine=engine, images=images), f"FakeRunner ({step_ms:g} ms/step)"


def progress_times(job: Job, sink: dict[str, float]) -> None:
    """Engine-side time of the job's first Progress event (same process, same clock as the client)."""

    def listener(event: Any) -> None:
        if isinstance(event, Progress) and job.job_id not in sink:
            sink[job.job_id] = time.perf_counter()

    job.subscribe(listener, after_seq=None)


def direct(runtime: Runtime, params: dict[str, Any], jobs: int, concurrent: int) -> list[float]:
    """Wall time per round of ``concurrent`` jobs submitted straight to the engine."""
    rounds = []
    for _ in range(jobs):
        start = time.perf_counter()
        submitted = [runtime.engine.submit(params, owner=f"direct{i}") for i in range(concurrent)]
        for job in submitted:
            job.wait(600)
        rounds.append(time.perf_counter() - start)
    return rounds


async def ws_round(url: str, params: dict[str, Any], concurrent: int, runtime: Runtime,
                   engine_progress: dict[str, float]) -> dict[str, list[float] | float]:
    sockets = [await connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, compression=None,
                             max_size=None) for _ in range(concurrent)]
    for ws in sockets:
        await ws.recv()  # hello
        await ws.send(json.dumps({"type": "set_preview", "enabled": False}))
        await ws.recv()
    accepted, first_progress, delivery = [], [], []
    ready = asyncio.Event()

    async def one(ws: Any) -> None:
        await ready.wait()
        sent = time.perf_counter()
        await ws.send(json.dumps({"type": "generate", "params": params}))
        job_id, position, got_progress = None, 0, False
        while True:
            raw = await ws.recv()
            now = time.perf_counter()
            if isinstance(raw, bytes):
                continue
            message = json.loads(raw)
            if message["type"] == "accepted":
                accepted.append(now - sent)
                job_id, position = message["job_id"], message["position"]
            elif message["type"] == "progress" and not got_progress:
                got_progress = True
                if position == 0:
                    first_progress.append(now - sent)
                delivery.append(now - engine_progress.get(job_id, now))
            elif message["type"] in ("done", "error", "cancelled"):
                return

    tasks = [asyncio.create_task(one(ws)) for ws in sockets]
    start = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    total = time.perf_counter() - start
    for ws in sockets:
        await ws.close()
    return {"total_s": total, "accepted_s": accepted, "first_progress_s": first_progress, "delivery_s": delivery}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runner", choices=["auto", "demo", "fake"], default="auto")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--step-ms", type=float, default=20.0, help="fake runner: sleep per step")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,10")
    args = parser.parse_args()
    kind = args.runner
    if kind == "auto":
        try:
            import engine.sdxl.pipeline  # noqa: F401
            kind = "demo"
        except ImportError:
            kind = "fake"
    tmp = Path(tempfile.mkdtemp(prefix="hooocus-bench-"))
    runtime, label = build_runtime(kind, args.step_ms, tmp)
    params = {"prompt": "a lighthouse at dusk", "steps": args.steps, "seed": 1, "width": args.size,
              "height": args.size}
    app = create_app(runtime, tokens=TokenStore.parse(f"bench {TOKEN} generate,cancel:own"), manage_runtime=False)
    config = uvicorn_config(app, host="127.0.0.1", port=0, max_message_bytes=64 * 1024, log_level="warning")
    server = uvicorn.Server(config)
    runtime.start()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"ws://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1/ws"
    engine_progress: dict[str, float] = {}
    runtime.engine.add_job_listener(lambda job: progress_times(job, engine_progress))

    print(f"runner: {label}; {args.steps} steps, {args.size}x{args.size} PNG, previews off, "
          f"{args.rounds} rounds, CPU, python {sys.version.split()[0]}")
    direct(runtime, params, 1, 1)  # warm-up (model load, first encode)
    report: dict[str, Any] = {"runner": label}
    for concurrent in [int(c) for c in args.clients.split(",")]:
        base, results = [], []
        for _ in range(args.rounds):  # interleaved, so load drift on the machine hits both alike
            base += direct(runtime, params, 1, concurrent)
            results.append(asyncio.run(ws_round(url, params, concurrent, runtime, engine_progress)))
        ws_total = [r["total_s"] for r in results]
        accepted = [x for r in results for x in r["accepted_s"]]  # type: ignore[union-attr]
        first = [x for r in results for x in r["first_progress_s"]]  # type: ignore[union-attr]
        delivery = [x for r in results for x in r["delivery_s"]]  # type: ignore[union-attr]
        overhead = (statistics.median(ws_total) - statistics.median(base)) / statistics.median(base) * 100
        ms = lambda xs: f"p50 {statistics.median(xs) * 1000:.2f} ms, max {max(xs) * 1000:.2f} ms"  # noqa: E731
        print(f"\n{concurrent} client(s): direct {statistics.median(base):.3f} s, websocket "
              f"{statistics.median(ws_total):.3f} s per round of {concurrent} job(s) -> overhead {overhead:+.2f} %")
        print(f"  request -> accepted:        {ms(accepted)}")
        print(f"  request -> first progress:  {ms(first)} (jobs that ran at once)")
        print(f"  engine progress -> client:  {ms(delivery)}")
        report[f"clients_{concurrent}"] = {"overhead_pct": round(overhead, 3),
                                           "accepted_p50_ms": statistics.median(accepted) * 1000,
                                           "first_progress_p50_ms": statistics.median(first) * 1000,
                                           "delivery_p50_ms": statistics.median(delivery) * 1000}
    server.should_exit = True
    thread.join(10)
    runtime.close()
    print("\n" + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
